"""Canonical points of an orbit; each is a group action, so the function is unchanged (exactly,
up to rounding).

- fix_to: bring every fixed entry to |w_K| = value (signs kept): λ solves E_K λ = log value - log|w_K|,
  triangular in peel order.
- balance: the group element minimising Σ‖w‖² over the orbit, convex in the log-scales. Only rescale
  generators take part: along a normalize generator Σ‖w‖² decreases to 0 without a minimiser."""
from __future__ import annotations

import math

import torch
import torch.nn as nn

__all__ = ["fix_to", "balance"]


@torch.no_grad()
def fix_to(report, skeleton, model: nn.Module, value: float = 1.0) -> torch.Tensor:
    """Act on `model` so that every K entry has magnitude `value`. Returns the log-scales used."""
    weights = dict(model.named_parameters())
    n = skeleton.num_classes
    lam = torch.zeros(report.num_generators + 1, dtype=torch.float64)   # last slot: no class
    logw = skeleton._values(weights, skeleton.fixed_param, skeleton.fixed_entry).abs().log()
    # consumer K: |w|·exp(-λ_c + λ_o) = value ; producer K: |w|·exp(λ_c - λ_o) = value
    own = torch.where(skeleton.consumer, logw - math.log(value), math.log(value) - logw)
    other = torch.where(skeleton.other < 0, report.num_generators, skeleton.other)
    for r in range(int(skeleton.fixed_round.max()) + 1 if n else 0):
        sel = (skeleton.fixed_round == r).nonzero().reshape(-1)
        lam[sel] = own[sel] + lam[other[sel]]
    lam = lam[:-1]
    report.act(model, lam)
    return lam


def balance(report, model: nn.Module, max_iter: int = 200, tol: float = 1e-10) -> torch.Tensor:
    """Act on `model` with the group element minimising Σ‖w‖² (rescale generators only); at the
    optimum every rescale class has as much squared weight entering as leaving it."""
    names = [n for n, _ in model.named_parameters()]
    w2 = {n: p.detach().to(torch.float64) ** 2 for n, p in model.named_parameters()}
    rescale = torch.tensor([g.kind == "rescale" for g in report.generators])
    lam = torch.zeros(int(rescale.sum()), dtype=torch.float64, requires_grad=True)
    full_idx = rescale.nonzero().reshape(-1)
    scale = sum(float(v.sum()) for v in w2.values())

    def objective():
        full = torch.zeros(report.num_generators, dtype=torch.float64).index_put((full_idx,), lam)
        return sum((w2[n] * torch.exp(2 * report.exponents(n, full))).sum() for n in names) / scale

    opt = torch.optim.LBFGS([lam], lr=1.0, max_iter=max_iter, tolerance_grad=tol,
                            tolerance_change=1e-14, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        f = objective()
        f.backward()
        return f

    opt.step(closure)
    full = torch.zeros(report.num_generators, dtype=torch.float64)
    full[full_idx] = lam.detach()
    report.act(model, full)
    return full
