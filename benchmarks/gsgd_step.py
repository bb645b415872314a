"""The G-SGD optimizer step against torch.optim.SGD(foreach=True) on the same parameters, CPU.

    python benchmarks/gsgd_step.py [--repeats 40]

MLP 784-1024x3-10 (2.9M parameters; the target's model) and ResNet-18-shaped with 10 classes
(11.2M; BatchNorm), gradients from one backward pass, steps timed alone and interleaved (SGD, GSGD,
GSGD on its PyTorch path, SGD, ...); each ratio is the median of the per-round ratios. Target
(DESIGN §6): <= 2.0 (the memory-traffic bound is at most 5 tensor passes against SGD's 3, 1.67;
fewer where a tensor's scale does not move with the carriers, 4 passes: kernels/cpu_step.cpp).
On CPU GSGD runs the fused C++ step; the last column is its PyTorch path (IC_KERNELS=off:
kernels/gsgd_step.py's reference_step), for comparison."""
from __future__ import annotations

import argparse
import itertools
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from invariance_compiler import kernels
from invariance_compiler.optim import GSGD
from invariance_compiler.tools.zoo import resnet18_like


def mlp():
    return nn.Sequential(nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(),
                         nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10))


MODELS = {"MLP 784-1024x3-10": (mlp, lambda: (torch.randn(256, 784), torch.randint(0, 10, (256,)))),
          "ResNet-18-shaped, 10 classes": (lambda: resnet18_like(num_classes=10),
                                           lambda: (torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))))}


def table(repeats: int = 40) -> str:
    rows = ["| model | momentum | weight decay | SGD(foreach) step | GSGD step (fused C++) | GSGD / SGD "
            "(median of interleaved) | PyTorch path / SGD |", "|---|---|---|---|---|---|---|"]
    for (name, (build, data)), (mom, wd) in itertools.product(MODELS.items(), ((0.0, 0.0), (0.9, 0.0), (0.9, 5e-4))):
        torch.manual_seed(0)
        x, y = data()
        a, b, c = build(), build(), build()
        steps = {"sgd": torch.optim.SGD(a.parameters(), lr=1e-3, momentum=mom, weight_decay=wd, foreach=True).step,
                 "gsgd": GSGD(b, lr=1e-3, momentum=mom, weight_decay=wd, example_inputs=(x[:2],)).step,
                 "torch": GSGD(c, lr=1e-3, momentum=mom, weight_decay=wd, example_inputs=(x[:2],)).step}
        modes = {"sgd": "auto", "gsgd": "auto", "torch": "off"}
        for m in (a, b, c):
            F.cross_entropy(m(x), y).backward()
        times = {k: [] for k in steps}
        for r in range(3 + repeats):
            for k, step in steps.items():
                with kernels.mode(modes[k]):
                    t0 = time.perf_counter()
                    step()
                    t = time.perf_counter() - t0
                if r >= 3:                                  # warm-up rounds dropped
                    times[k].append(t)
        ratio = lambda k: statistics.median(q / s for s, q in zip(times["sgd"], times[k]))
        ms = lambda k: statistics.median(times[k]) * 1e3
        rows.append(f"| {name} | {mom} | {wd} | {ms('sgd'):.2f} ms | {ms('gsgd'):.2f} ms | {ratio('gsgd'):.2f} "
                    f"| {ratio('torch'):.2f} |")
    return "\n".join(rows)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--repeats", type=int, default=40)
    print(table(p.parse_args().repeats))


if __name__ == "__main__":
    main()
