"""One training step (forward, backward, SGD) of compiled modules over the original model, CPU.

    python benchmarks/train_step.py [--repeats 30]

Runs are interleaved (original, gspace, fixed, original, ...) and each ratio is the median of the
per-round ratios, so drifting machine load cancels. Targets (DESIGN §6): gspace / original <= 1.10
(aim 1.03) on the MLP 784-1024-1024-1024-10 at batch 256."""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import invariance_compiler as ic


def mlp():
    return nn.Sequential(nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(),
                         nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10)), torch.randn(256, 784)


def cnn():
    return nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(64 * 8 * 8, 128), nn.ReLU(), nn.Linear(128, 10)), \
        torch.randn(64, 3, 32, 32)


def step_fn(model, x, y):
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)

    def step():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return step


def interleaved(steps: dict, repeats: int, warmup: int = 3) -> dict:
    """Seconds of each call of each step, the steps run in turn (a, b, c, a, b, c, ...) so that
    drifting machine load falls on all of them alike; after `warmup` calls of each."""
    for s in steps.values():
        for _ in range(warmup):
            s()
    times = {k: [] for k in steps}
    for _ in range(repeats):
        for k, s in steps.items():
            t = time.perf_counter()
            s()
            times[k].append(time.perf_counter() - t)
    return times


def bench(name, build, repeats):
    torch.manual_seed(0)
    model, x = build()
    y = torch.randint(0, 10, (x.shape[0],))
    variants = {"original": model,
                "gspace": ic.compile_invariant(model, x[:2], form="gspace"),
                "fixed": ic.compile_invariant(model, x[:2], form="fixed")}
    times = interleaved({k: step_fn(m, x, y) for k, m in variants.items()}, repeats)
    base = times["original"]
    rows = []
    for k in ("gspace", "fixed"):
        ratio = statistics.median(t / b for t, b in zip(times[k], base))
        rows.append((name, k, statistics.median(base) * 1e3, statistics.median(times[k]) * 1e3, ratio))
    return rows


def table(repeats: int = 30) -> str:
    rows = ["| model | form | original step | compiled step | ratio (median of interleaved) |",
            "|---|---|---|---|---|"]
    for name, build in (("MLP 784-1024x3-10, batch 256", mlp), ("CNN 2 conv + 2 fc, batch 64, 32x32", cnn)):
        for row in bench(name, build, repeats):
            rows.append(f"| {row[0]} | {row[1]} | {row[2]:.2f} ms | {row[3]:.2f} ms | {row[4]:.3f} |")
    return "\n".join(rows)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=30)
    print(table(ap.parse_args().repeats))


if __name__ == "__main__":
    main()
