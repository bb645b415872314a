"""Where the gspace module's eager step goes beyond the plain model's, one layer at a time, CPU.

    python benchmarks/layer_overhead.py [--shapes 4x64x256x256,256x1024x1024] [--threads 1]

1. Small ops after a GEMM: each op's time alone (hot) and right after a 512² matrix product, which
   evicts the caches as a model's own products do between two small ops (cold).
2. One layer's forward and backward, each after a GEMM as in a model: F.linear (PyTorch's own
   autograd) against the scaled layer's node (ScaledProduct: x ⊙ r_in, the product, ⊙ r_out, and
   its backward with the slots' and r_in's gradients), interleaved; µs (the 512² GEMMs included,
   the same in both) and the difference.
A shape is rows x in x out, or batch x tokens x in x out."""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from invariance_compiler.codegen.scaled import ScaledProduct

BIG = None


def timed(f, cold: bool, repeats: int = 200) -> float:
    """Median µs of f(), each call after a 512² GEMM when `cold`."""
    ts = []
    for _ in range(repeats):
        if cold:
            BIG @ BIG
        t = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e6


def small_ops() -> list[str]:
    x, r, s = torch.randn(256, 256), torch.rand(256), torch.rand(556)
    ops = {"torch.empty_like (256x256)": lambda: torch.empty_like(x), "x * r (256x256)": lambda: x * r,
           "split of a 556-vector": lambda: s.split((256, 300)), "x.view(-1)": lambda: x.view(-1)}
    rows = ["| op | hot | after a GEMM |", "|---|---|---|"]
    for name, f in ops.items():
        rows.append(f"| {name} | {timed(f, False):.1f} µs | {timed(f, True):.1f} µs |")
    return rows


def layer(shape: tuple[int, ...]) -> str:
    *lead, i, o = shape
    x0, gy = torch.randn(*lead, i), torch.randn(*lead, o)
    w = torch.randn(o, i, requires_grad=True)
    nk = min(o * i, 300)                                   # slots: a K or J entry per row or so
    scales = (torch.rand(i + nk) + 0.5).requires_grad_()
    slot, r_out = torch.randperm(o * i)[:nk], torch.rand(o) + 0.5

    def run(forward):
        def step():
            x = x0.clone().requires_grad_()
            BIG @ BIG
            y = forward(x)
            BIG @ BIG
            y.backward(gy)
            w.grad = scales.grad = None
        return step

    steps = {"F.linear": run(lambda x: F.linear(x, w)),
             "ScaledProduct": run(lambda x: ScaledProduct.apply(x, w, None, scales, (i, nk, 0), r_out, slot))}
    for s in steps.values():
        s()
    t = {k: [] for k in steps}
    for _ in range(100):
        for k, s in steps.items():
            a = time.perf_counter()
            s()
            t[k].append(time.perf_counter() - a)
    med = {k: statistics.median(v) * 1e6 for k, v in t.items()}
    return (f"| {'x'.join(map(str, shape))} | {med['F.linear']:.0f} µs | {med['ScaledProduct']:.0f} µs "
            f"(+{med['ScaledProduct'] - med['F.linear']:.0f}) |")


def main():
    global BIG
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="4x64x256x256,256x1024x1024")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    BIG = torch.randn(512, 512)
    print("\n".join(small_ops()))
    print()
    print("| layer (rows x in x out) | F.linear fwd+bwd | ScaledProduct fwd+bwd |")
    print("|---|---|---|")
    for s in a.shapes.split(","):
        print(layer(tuple(int(d) for d in s.split("x"))))


if __name__ == "__main__":
    main()
