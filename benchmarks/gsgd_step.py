"""The G-SGD optimizer step against torch.optim.SGD(foreach=True) on the same parameters, CPU.

    python benchmarks/gsgd_step.py [--repeats 40]

MLP 784-1024x3-10 (2.9M parameters), gradients from one backward pass, steps timed alone and
interleaved (SGD, GSGD, SGD, ...); each ratio is the median of the per-round ratios. Target
(DESIGN §6): <= 2.0 (the memory-traffic bound is about 1.7). On CPU GSGD runs the two passes of
kernels/gsgd_step.py in PyTorch ops (optim/gsgd.py: _TorchStep)."""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from invariance_compiler.optim import GSGD


def mlp():
    return nn.Sequential(nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(),
                         nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10))


def table(repeats: int = 40) -> str:
    torch.manual_seed(0)
    x, y = torch.randn(256, 784), torch.randint(0, 10, (256,))
    rows = ["| momentum | weight decay | SGD(foreach) step | GSGD step | GSGD / SGD (median of interleaved) |",
            "|---|---|---|---|---|"]
    for mom, wd in ((0.0, 0.0), (0.9, 0.0), (0.9, 5e-4)):
        a, b = mlp(), mlp()
        sgd = torch.optim.SGD(a.parameters(), lr=1e-3, momentum=mom, weight_decay=wd, foreach=True)
        gsgd = GSGD(b, lr=1e-3, momentum=mom, weight_decay=wd, example_inputs=(x[:2],))
        for m in (a, b):
            F.cross_entropy(m(x), y).backward()
        ta, tb = [], []
        for _ in range(3):
            sgd.step(), gsgd.step()
        for _ in range(repeats):
            t0 = time.perf_counter()
            sgd.step()
            t1 = time.perf_counter()
            gsgd.step()
            t2 = time.perf_counter()
            ta.append(t1 - t0)
            tb.append(t2 - t1)
        ratio = statistics.median(q / s for s, q in zip(ta, tb))
        rows.append(f"| {mom} | {wd} | {statistics.median(ta) * 1e3:.2f} ms | {statistics.median(tb) * 1e3:.2f} ms "
                    f"| {ratio:.2f} |")
    return "\n".join(rows)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--repeats", type=int, default=40)
    print(table(p.parse_args().repeats))


if __name__ == "__main__":
    main()
