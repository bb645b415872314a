"""The third paper's Figure 1 on real data (scikit-learn's digits): a BatchNorm network started
from balanced weights and from an unbalanced copy T_a(W) (half of its PSI vectors ×1e4, half
×1e-4; the same function), trained by SGD and by PSI-SGD. Writes out/psi_figure1.png and
out/psi_figure1.md.

    python examples/reproduce_psi.py [--steps 300] [--out out]

PSI-SGD's iterates from T_a(W) are T_a of its iterates from W (Theorem 1), so its two curves
coincide; SGD's step sizes depend on the scale, so the unbalanced start trains differently."""
from __future__ import annotations

import argparse
import copy
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

import invariance_compiler as ic


def digits():
    from sklearn.datasets import load_digits
    d = load_digits()
    return torch.tensor(d.data, dtype=torch.float64) / 16.0, torch.tensor(d.target)


def network():
    return nn.Sequential(nn.Linear(64, 32), nn.BatchNorm1d(32, eps=1e-20), nn.ReLU(),
                         nn.Linear(32, 32), nn.BatchNorm1d(32, eps=1e-20), nn.ReLU(),
                         nn.Linear(32, 10)).double()


def unbalanced(model, report):
    """T_a: half of the PSI vectors scaled by 1e4, the other half by 1e-4 (a group action)."""
    lam = torch.zeros(report.num_generators, dtype=torch.float64)
    psi = [g.index for g in report.generators if g.kind == "normalize"]
    for k, i in enumerate(psi):
        lam[i] = (1 if k % 2 == 0 else -1) * 4 * torch.log(torch.tensor(10.0, dtype=torch.float64))
    return report.act(copy.deepcopy(model), lam)


def run(steps: int, out_dir: str, seed: int = 0, lr: float = 0.1) -> dict:
    torch.manual_seed(seed)
    x, y = digits()
    model = network()
    report = ic.analyze(model, (x[:4],))
    starts = {"balanced": model, "unbalanced": unbalanced(model, report)}
    makers = {"SGD": lambda m: torch.optim.SGD(m.parameters(), lr=lr),
              "PSI-SGD": lambda m: ic.optim.PSISGD(m, lr=lr, report=report)}
    order = torch.Generator().manual_seed(seed)
    batches = [torch.randint(0, x.shape[0], (100,), generator=order) for _ in range(steps)]
    curves = {}
    for opt_name, make in makers.items():
        for start, m0 in starts.items():
            m = copy.deepcopy(m0)
            opt = make(m)
            losses = []
            for idx in batches:
                opt.zero_grad()
                loss = F.cross_entropy(m(x[idx]), y[idx])
                loss.backward()
                opt.step()
                losses.append(float(loss.detach()))
            curves[(opt_name, start)] = losses
    os.makedirs(out_dir, exist_ok=True)
    _plot(curves, os.path.join(out_dir, "psi_figure1.png"))
    with open(os.path.join(out_dir, "psi_figure1.md"), "w") as f:
        f.write(f"digits, BN MLP 64-32-32-10, batch 100, lr {lr}, {steps} steps, seed {seed}\n\n")
        f.write("| optimizer | start | final loss (mean of last 20 steps) |\n|---|---|---|\n")
        for (o, s), c in curves.items():
            f.write(f"| {o} | {s} | {sum(c[-20:]) / len(c[-20:]):.4f} |\n")
    return curves


def _plot(curves, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    styles = {"balanced": "-", "unbalanced": "--"}
    for (o, s), c in curves.items():
        ax.plot(c, styles[s], label=f"{o}, {s} start", color="tab:blue" if o == "SGD" else "tab:orange")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (cross-entropy)")
    ax.set_yscale("log")
    ax.set_title("PSI-SGD vs SGD from a balanced and an unbalanced start")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--out", default="out")
    args = ap.parse_args()
    run(args.steps, args.out)
    print(open(os.path.join(args.out, "psi_figure1.md")).read())
    print(f"wrote {args.out}/psi_figure1.png and {args.out}/psi_figure1.md")
