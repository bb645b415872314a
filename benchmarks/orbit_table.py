"""One G-space per orbit, over the zoo: compile A and g·A (g a random element of A's report, λ ~
N(0, 0.5²), on the generators compile removes), train both for 30 steps on the same batch, and
report whether the skeletons agree and how far the functions end apart (relative max error),
beside plain SGD on the two sets of weights. float64, negligible normaliser eps.

    python benchmarks/orbit_table.py [names...]"""
from __future__ import annotations

import copy
import sys
import warnings

import torch
import torch.nn.functional as F

import invariance_compiler as ic
from invariance_compiler.analyze import oracle
from invariance_compiler.tools.zoo import ZOO

STEPS = 30


def _run(model, opt, x, loss):
    for _ in range(STEPS):
        torch.manual_seed(1)
        opt.zero_grad()
        loss(model(*x)).backward()
        opt.step()
    torch.manual_seed(1)
    return model(*x).detach()


def row(name: str) -> str:
    torch.manual_seed(0)
    model, x = ZOO[name]()
    a = oracle.prepare(model)
    x = tuple(t.double() if t.is_floating_point() else t for t in x)
    report = ic.analyze(a, x)
    lam = torch.randn(report.num_generators, dtype=torch.float64) * 0.5
    lam[report.num_simple: report._inert_start] = 0
    b = copy.deepcopy(a)
    report.act(b, lam)
    out = a(*x)
    y = torch.randint(0, out.shape[-1], (out.shape[0],)) if out.dim() == 2 else None
    loss = (lambda o: F.cross_entropy(o, y)) if y is not None else (lambda o: (o ** 2).mean())
    gap = lambda fa, fb: float((fa - fb).abs().max() / fa.abs().max())
    cells = []
    ca, cb = ic.compile_invariant(a, x), ic.compile_invariant(b, x)
    same = all(torch.equal(getattr(ca.skeleton, k), getattr(cb.skeleton, k)) for k in ca.skeleton._STATE)
    for make in (lambda p: torch.optim.SGD(p, lr=1e-3), lambda p: torch.optim.Adam(p, lr=1e-3, eps=1e-6)):
        ma, mb = copy.deepcopy(ca), copy.deepcopy(cb)
        cells.append(gap(_run(ma, make(ma.parameters()), x, loss), _run(mb, make(mb.parameters()), x, loss)))
    pa, pb = copy.deepcopy(a), copy.deepcopy(b)
    plain = gap(_run(pa, torch.optim.SGD(pa.parameters(), lr=1e-2), x, loss),
                _run(pb, torch.optim.SGD(pb.parameters(), lr=1e-2), x, loss))
    return (f"| {name} | {report.num_simple} | {'yes' if same else 'no'} | {cells[0]:.1e} | {cells[1]:.1e} | "
            f"{plain:.1e} |")


if __name__ == "__main__":
    warnings.simplefilter("ignore")
    print("| model | plain classes | same skeleton | G-space SGD gap | G-space Adam gap | plain SGD gap (lr 1e-2) |")
    print("|---|---|---|---|---|---|")
    for name in sys.argv[1:] or sorted(ZOO):
        print(row(name), flush=True)
