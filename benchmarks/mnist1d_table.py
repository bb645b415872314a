"""MNIST-1D (Greydanus, "Scaling down deep learning", arXiv:2011.14439): the MLP and the CNN of its
repository at PyTorch's default initialisation, trained with SGD, SGD with momentum and Adam on the
plain model, on the gspace module (scaled coordinates) and on the fixed-weight module, and with
ic.optim.GSGD; 3 seeds, one learning-rate grid per method, the best learning rate by mean final
test accuracy. The data is generated offline by the `mnist1d` package's make_dataset (the standard
4000/1000 split of length 40; pip install mnist1d).

    python benchmarks/mnist1d_table.py [--models mlp,cnn] [--steps 6000] [--seeds 3] [--png out.png]
                                       [--methods "SGD gspace,Adam"]

Prints a markdown table of test accuracy (mean ± std over seeds) and writes the mean test-accuracy
curves of each method at its best learning rate as a PNG. The MNIST-1D README's baselines (its
own training: Adam, 6000 steps): logistic regression 32 %, MLP 68 %, CNN 94 %, GRU 91 %."""
from __future__ import annotations

import argparse
import copy
import statistics
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

import invariance_compiler as ic


class ConvBase(nn.Module):
    """The MNIST-1D repository's CNN: three strided 1-D convolutions with ReLU, a linear head."""

    def __init__(self, channels: int = 25, linear_in: int = 125, classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv1d(1, channels, 5, stride=2, padding=1)
        self.conv2 = nn.Conv1d(channels, channels, 3, stride=2, padding=1)
        self.conv3 = nn.Conv1d(channels, channels, 3, stride=2, padding=1)
        self.linear = nn.Linear(linear_in, classes)

    def forward(self, x):
        h = F.relu(self.conv1(x.view(-1, 1, x.shape[-1])))
        h = F.relu(self.conv2(h))
        h = F.relu(self.conv3(h))
        return self.linear(h.view(h.shape[0], -1))


MODELS = {"mlp": lambda: nn.Sequential(nn.Linear(40, 100), nn.ReLU(), nn.Linear(100, 100), nn.ReLU(),
                                       nn.Linear(100, 10)),
          "cnn": ConvBase}
# method: (module, optimizer, learning rates)
METHODS = {
    "SGD": ("plain", "sgd", (0.3, 0.1, 0.03)),
    "SGD gspace": ("gspace", "sgd", (0.3, 0.1, 0.03)),
    "SGD fixed": ("fixed", "sgd", (0.3, 0.1, 0.03)),
    "SGD-m": ("plain", "sgdm", (0.03, 0.01, 0.003)),
    "SGD-m gspace": ("gspace", "sgdm", (0.03, 0.01, 0.003)),
    "SGD-m fixed": ("fixed", "sgdm", (0.03, 0.01, 0.003)),
    "G-SGD (ic.optim.GSGD, momentum)": ("plain", "gsgd", (0.03, 0.01, 0.003)),
    "Adam": ("plain", "adam", (1e-2, 3e-3, 1e-3)),
    "Adam gspace": ("gspace", "adam", (1e-2, 3e-3, 1e-3)),
    "Adam fixed": ("fixed", "adam", (1e-2, 3e-3, 1e-3)),
}


def data():
    from mnist1d.data import get_dataset_args, make_dataset
    d = make_dataset(get_dataset_args())                    # generated from templates; no download
    f = lambda a: torch.tensor(a, dtype=torch.float32)
    return f(d["x"]), torch.tensor(d["y"]), f(d["x_test"]), torch.tensor(d["y_test"])


def build(model, kind, opt, lr, example):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net = model if kind == "plain" else ic.compile_invariant(model, (example,), form=kind)
        if opt == "sgd":
            return net, torch.optim.SGD(net.parameters(), lr=lr)
        if opt == "sgdm":
            return net, torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)
        if opt == "gsgd":
            return net, ic.optim.GSGD(net, lr=lr, momentum=0.9, example_inputs=(example,))
        return net, torch.optim.Adam(net.parameters(), lr=lr)


def run(model, kind, opt, lr, d, steps, seed):
    xtr, ytr, xte, yte = d
    net, optimizer = build(copy.deepcopy(model), kind, opt, lr, xtr[:2])
    g = torch.Generator().manual_seed(seed)
    every = max(1, steps // 24)
    curve = []
    for step in range(1, steps + 1):
        idx = torch.randint(0, len(xtr), (100,), generator=g)
        optimizer.zero_grad(set_to_none=True)
        try:
            loss = F.cross_entropy(net(xtr[idx]), ytr[idx])
        except FloatingPointError:                          # a carrier reached 0: diverged
            return [0.1] * (steps // every), 0.1
        if not torch.isfinite(loss):
            return curve + [0.1] * (steps // every - len(curve)), 0.1
        loss.backward()
        optimizer.step()
        if step % every == 0:
            with torch.no_grad():
                curve.append((net(xte).argmax(1) == yte).float().mean().item())
    return curve, curve[-1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="mlp,cnn")
    ap.add_argument("--steps", type=int, default=6000)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--png", default="")
    ap.add_argument("--methods", default="", help="comma-separated subset of the methods (default: all)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    d = data()
    curves = {}
    for name in args.models.split(","):
        print(f"\n### {name}\n\n| method | best lr | test accuracy (mean ± std, {args.seeds} seeds) |\n|---|---|---|",
              flush=True)
        for method, (kind, opt, lrs) in METHODS.items():
            if args.methods and method not in args.methods.split(","):
                continue
            best = None
            for lr in lrs:
                accs, cs = [], []
                for seed in range(args.seeds):
                    torch.manual_seed(seed)
                    c, acc = run(MODELS[name](), kind, opt, lr, d, args.steps, seed)
                    accs.append(acc), cs.append(c)
                mean = statistics.mean(accs)
                if best is None or mean > best[0]:
                    best = (mean, statistics.stdev(accs) if len(accs) > 1 else 0.0, lr, cs)
            mean, std, lr, cs = best
            curves[(name, method)] = [statistics.mean(v) for v in zip(*cs)]
            print(f"| {method} | {lr:g} | {100 * mean:.1f} ± {100 * std:.1f} % |", flush=True)
    if args.png:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        names = args.models.split(",")
        fig, axes = plt.subplots(1, len(names), figsize=(6 * len(names), 4), squeeze=False)
        for ax, name in zip(axes[0], names):
            for method in [m for m in METHODS if (name, m) in curves]:
                c = curves[(name, method)]
                ax.plot([max(1, args.steps // 24) * (i + 1) for i in range(len(c))], [100 * v for v in c], label=method,
                        linestyle="-" if "gspace" in method else ("--" if "fixed" in method else ":"))
            ax.set_title(f"MNIST-1D {name}: mean test accuracy at the best lr")
            ax.set_xlabel("step"), ax.set_ylabel("test accuracy (%)"), ax.set_ylim(0, 100)
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(args.png, dpi=120)
        print(f"\nwrote {args.png}")


if __name__ == "__main__":
    main()
