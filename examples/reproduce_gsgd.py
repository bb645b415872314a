"""G-SGD's claims in the small, on scikit-learn's digits (offline; 1437 train / 360 validation):

  1. Meng et al. §5.2: G-SGD's gain over SGD against the invariant ratio H/m, for 2-hidden-layer
     bias-free MLPs [64:h:h:10] of several widths (paper: the gain shrinks as H/m falls).
  2. Jestädt, Figure 4.1 (with Meng et al. §5.3's Path-SGD beside it): best validation loss against
     the learning rate μ ∈ 10^-1 ... 10^-5 for SGD, G-SGD, Adam, G-Adam, fixed-weight SGD and Path-SGD
     on a bias-free MLP with four hidden layers of 64 (thesis: G-SGD and fixed SGD are robust over a
     wider range of μ; G-Adam underperforms).

Every run of a seed starts from the same weights: He init with the skeleton entries at 1 (G-SGD's
initialisation). Batch 64, no momentum, no weight decay. Mean ± std over seeds.

    python examples/reproduce_gsgd.py [--seeds 3] [--epochs 20] [--out out]

Writes out/gsgd_invariant_ratio.png, out/gsgd_lr_sweep.png and out/reproduce_gsgd.md (about 4
minutes on 2 cores)."""
from __future__ import annotations

import argparse
import copy
import math
import os
import statistics
import time
import warnings

import torch
import torch.nn as nn

import invariance_compiler as ic
from invariance_compiler.tools.demo import build_run, digits, he_skeleton_init, mlp, train


class PathSGD(torch.optim.Optimizer):
    """Path-SGD (Neyshabur et al. 2015) for a chain of bias-free Linear weights: each entry's step
    is divided by γ_e, the sum over the input-output paths through it of the product of the other
    squared weights: γ = (W²-forward of ones up to its input) ⊗ (W²-backward of ones from its output)."""

    def __init__(self, weights: list, lr: float):
        super().__init__(weights, dict(lr=lr))

    @torch.no_grad()
    def step(self):
        ws = self.param_groups[0]["params"]
        sq = [w * w for w in ws]
        fwd = [torch.ones(ws[0].shape[1], dtype=ws[0].dtype)]
        for s in sq[:-1]:
            fwd.append(s @ fwd[-1])
        bwd = [torch.ones(ws[-1].shape[0], dtype=ws[-1].dtype)]
        for s in reversed(sq[1:]):
            bwd.insert(0, s.T @ bwd[0])
        lr = self.param_groups[0]["lr"]
        for w, a, b in zip(ws, fwd, bwd):
            if w.grad is not None:
                w.sub_(lr * w.grad / torch.outer(b, a).clamp_min(1e-12))


def make(name: str, start: nn.Module, example, lr: float):
    """(module to train, optimizer) for one named method, from a copy of `start`; the demo's
    methods (SGD, G-SGD, G-Adam, fixed SGD) come from demo.build_run, without momentum."""
    model = copy.deepcopy(start)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if name == "Adam":
            return model, torch.optim.Adam(model.parameters(), lr=lr)
        if name == "G-SGD (gspace)":  # the thesis's way: torch SGD on the G-space module
            cm = ic.compile_invariant(model, example, form="gspace", coordinates="paths")
            return cm, torch.optim.SGD(cm.parameters(), lr=lr)
        if name == "Path-SGD":
            return model, PathSGD([m.weight for m in model if isinstance(m, nn.Linear)], lr)
        return build_run(name, model, example, lr)


def mean_std(xs):
    xs = [x for x in xs if math.isfinite(x)]
    if not xs:
        return float("nan"), float("nan")
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def best(curve):
    finite = [v for v in curve if math.isfinite(v)]
    return min(finite) if finite else float("nan")


def invariant_ratio(data, widths, seeds, epochs, lr=0.01):
    rows = []
    for h in widths:
        arch = (64, h, h, 10)
        res = {"SGD": [], "G-SGD": []}
        for seed in range(seeds):
            torch.manual_seed(seed)
            start = he_skeleton_init(mlp(arch, bias=False), data[0][:2], seed=seed)
            for name in res:
                net, opt = make(name, start, data[0][:2], lr)
                res[name].append(train(net, opt, data, epochs, seed=seed + 1))
        report = ic.analyze(mlp(arch, bias=False), data[0][:2])
        gain_loss = [a["train_loss"][-1] - b["train_loss"][-1] for a, b in zip(res["SGD"], res["G-SGD"])]
        gain_err = [100 * (b["test_acc"][-1] - a["test_acc"][-1]) for a, b in zip(res["SGD"], res["G-SGD"])]
        rows.append(dict(h=h, m=report.num_params, H=report.num_generators,
                         ratio=report.num_generators / report.num_params,
                         sgd=mean_std([r["train_loss"][-1] for r in res["SGD"]]),
                         gsgd=mean_std([r["train_loss"][-1] for r in res["G-SGD"]]),
                         gain_loss=mean_std(gain_loss), gain_err=mean_std(gain_err)))
        r = rows[-1]
        print(f"  h={h:4d} H/m={r['ratio']:.2e}: train loss SGD {r['sgd'][0]:.4f} G-SGD {r['gsgd'][0]:.4f}; "
              f"test accuracy gain {r['gain_err'][0]:+.1f} points", flush=True)
    return rows


def lr_sweep(data, methods, lrs, seeds, epochs):
    arch = (64, 64, 64, 64, 64, 10)
    out = {m: {} for m in methods}
    for seed in range(seeds):
        torch.manual_seed(seed)
        start = he_skeleton_init(mlp(arch, bias=False), data[0][:2], seed=seed)
        for name in methods:
            for lr in lrs:
                net, opt = make(name, start, data[0][:2], lr)
                r = train(net, opt, data, epochs, seed=seed + 1)
                out[name].setdefault(lr, []).append(best(r["test_loss"]))
        print(f"  seed {seed} done", flush=True)
    return {m: {lr: mean_std(v) for lr, v in d.items()} for m, d in out.items()}


def plot_ratio(rows, png):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    x = [r["ratio"] for r in rows]
    for ax, key, label in ((a, "gain_loss", "final training loss: SGD − G-SGD"),
                           (b, "gain_err", "test accuracy: G-SGD − SGD (points)")):
        ax.errorbar(x, [r[key][0] for r in rows], yerr=[r[key][1] for r in rows], marker="o", capsize=3)
        for r in rows:
            ax.annotate(f"h={r['h']}", (r["ratio"], r[key][0]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
        ax.axhline(0, color="grey", lw=0.8)
        ax.set(xscale="log", xlabel="invariant ratio H/m", ylabel=label)
        ax.grid(alpha=0.3)
    a.set_title("G-SGD's gain in training loss")
    b.set_title("G-SGD's gain in test accuracy")
    fig.suptitle("MLP [64:h:h:10] on digits, lr 0.01, batch 64; mean ± std over seeds (> 0: G-SGD better)")
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


def plot_sweep(sweep, lrs, png):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, d in sweep.items():
        ax.errorbar(lrs, [d[lr][0] for lr in lrs], yerr=[d[lr][1] for lr in lrs], marker="o", capsize=3,
                    label=name, ls="--" if "Adam" in name else "-")
    ax.set(xscale="log", yscale="log", xlabel="learning rate μ", ylabel="best validation loss over the epochs",
           ylim=(None, 30), title="Learning-rate robustness, MLP 64-(64)x4-10 on digits\n"
                                  "(mean ± std over seeds; off the top: diverged)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--widths", default="8,16,32,64,128,256")
    ap.add_argument("--out", default="out")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    t0 = time.perf_counter()
    data = digits()
    widths = [int(w) for w in args.widths.split(",")]
    print(f"1. invariant ratio: MLP [64:h:h:10], h in {widths}, {args.seeds} seeds, {args.epochs} epochs")
    rows = invariant_ratio(data, widths, args.seeds, args.epochs)
    lrs = [1e-1, 1e-2, 1e-3, 1e-4, 1e-5]
    methods = ["SGD", "G-SGD (gspace)", "fixed SGD", "Path-SGD", "Adam", "G-Adam"]
    print(f"2. learning-rate sweep: {methods} at μ in {lrs}")
    sweep = lr_sweep(data, methods, lrs, args.seeds, args.epochs)

    p1, p2 = os.path.join(args.out, "gsgd_invariant_ratio.png"), os.path.join(args.out, "gsgd_lr_sweep.png")
    plot_ratio(rows, p1)
    plot_sweep(sweep, lrs, p2)
    md = [f"# G-SGD on digits ({args.seeds} seeds, {args.epochs} epochs, batch 64; "
          f"`python examples/reproduce_gsgd.py --seeds {args.seeds} --epochs {args.epochs}`)\n",
          "## 1. Gain against the invariant ratio (Meng et al. §5.2), lr 0.01\n",
          "| h | m | H | H/m | final train loss SGD | final train loss G-SGD | loss gain | test accuracy gain (points) |",
          "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['h']} | {r['m']} | {r['H']} | {r['ratio']:.2e} | {r['sgd'][0]:.4f} ± {r['sgd'][1]:.4f} "
                  f"| {r['gsgd'][0]:.4f} ± {r['gsgd'][1]:.4f} | {r['gain_loss'][0]:+.4f} ± {r['gain_loss'][1]:.4f} "
                  f"| {r['gain_err'][0]:+.1f} ± {r['gain_err'][1]:.1f} |")
    md += ["", "## 2. Best validation loss against the learning rate (Jestädt Fig. 4.1; Path-SGD of Meng §5.3)\n",
           "| method | " + " | ".join(f"μ = {lr:g}" for lr in lrs) + " |", "|---|" + "---|" * len(lrs)]
    for name, d in sweep.items():
        md.append(f"| {name} | " + " | ".join("diverged" if math.isnan(d[lr][0]) else f"{d[lr][0]:.3f} ± {d[lr][1]:.3f}"
                                            for lr in lrs) + " |")
    md.append(f"\n({time.perf_counter() - t0:.0f} s; {os.cpu_count()} cores, torch {torch.__version__})")
    with open(os.path.join(args.out, "reproduce_gsgd.md"), "w") as f:
        f.write("\n".join(md) + "\n")
    print("\n".join(md))
    print(f"\nwrote {p1}, {p2}, {os.path.join(args.out, 'reproduce_gsgd.md')}")


if __name__ == "__main__":
    main()
