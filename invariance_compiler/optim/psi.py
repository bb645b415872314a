"""PSI-SGD / PSI-SGDM (Yi et al., Algorithm 1): SGD on the positively-scale-invariant manifold.

A PSI weight vector w⁽ⁱ⁾ is the entry set of one normalize generator of the report (the rows that
feed a BatchNorm channel, a LayerNorm's joint scale ...). Its update is
    u ← ρ·u − η·‖w⁽ⁱ⁾‖²·∇w,   w ← w + u
so that starting from T_a(W) gives T_a of the iterates (Theorem 1). Every other entry follows SGD
with momentum. A PSI vector whose norm exceeds `max_norm` (the paper: 1e4) is renormalised to unit
norm together with its momentum, which changes neither the function nor the trajectory's class."""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn as nn

from ..analyze import analyze

__all__ = ["PSISGD", "psi_groups"]


def psi_groups(report) -> dict[str, torch.Tensor]:
    """{parameter: compact tensor of PSI group ids (normalize generator columns), -1 elsewhere}."""
    normalize = torch.tensor([g.kind == "normalize" for g in report.generators] + [False])
    out = {}
    for name in report.param_names:
        if report.is_inert(name):
            continue
        _, produced = report.sides(name)
        group = torch.where(normalize[produced], produced, -1)
        if bool((group >= 0).any()):
            out[name] = group
    return out


class PSISGD(torch.optim.Optimizer):
    def __init__(self, model: nn.Module, lr: float = 0.1, momentum: float = 0.0,
                 weight_decay: float = 0.0, max_norm: float = 1e4, example_inputs: Any = None,
                 report=None):
        if lr <= 0 or not 0 <= momentum < 1 or weight_decay < 0 or max_norm <= 0:
            raise ValueError(f"PSISGD: need lr > 0, 0 <= momentum < 1, weight_decay >= 0 (non-PSI "
                             f"entries only: a decay breaks the PSI property), max_norm > 0")
        report = report if report is not None else analyze(model, example_inputs)
        named = dict(model.named_parameters())
        groups = psi_groups(report)
        self.num_groups = report.num_generators
        super().__init__(list(named.values()), dict(lr=lr, momentum=momentum,
                                                    weight_decay=weight_decay, max_norm=max_norm))
        self._group_of = {named[n]: g.to(named[n].device) for n, g in groups.items()}

    @torch.no_grad()
    def step(self, closure: Optional[Any] = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        group = self.param_groups[0]
        lr, mom, wd, max_norm = group["lr"], group["momentum"], group["weight_decay"], group["max_norm"]
        params = [p for p in group["params"] if p.grad is not None]
        norm2 = self._norms(params)
        for p in params:
            g = self._group_of.get(p)
            d = p.grad
            if g is None:
                d = d.add(p, alpha=wd) if wd else d
            else:                                       # ‖w‖²·∇ on PSI entries, SGD (+ decay) elsewhere
                ids = torch.where(g < 0, self.num_groups, g)
                scale = torch.where(g < 0, torch.ones((), dtype=p.dtype, device=p.device), norm2[ids])
                d = d * scale
                if wd:
                    d = d + wd * torch.where(g < 0, p, torch.zeros((), dtype=p.dtype, device=p.device))
            if mom:
                buf = self.state[p].get("momentum_buffer")
                if buf is None:
                    buf = self.state[p]["momentum_buffer"] = (-lr * d).clone()
                else:
                    buf.mul_(mom).add_(d, alpha=-lr)
                p.add_(buf)
            else:
                p.add_(d, alpha=-lr)
        self._renormalise(params, max_norm)
        return loss

    def _norms(self, params) -> Optional[torch.Tensor]:
        """‖w⁽ⁱ⁾‖² of every PSI vector, across parameters (a vector may span weight and bias);
        the last slot collects the non-PSI entries."""
        norm2 = None
        for p in params:
            g = self._group_of.get(p)
            if g is not None:
                if norm2 is None:
                    norm2 = torch.zeros(self.num_groups + 1, dtype=p.dtype, device=p.device)
                ids = g.expand(p.shape).reshape(-1)
                norm2.index_add_(0, torch.where(ids < 0, self.num_groups, ids), p.detach().reshape(-1) ** 2)
        return norm2

    def _renormalise(self, params, max_norm):
        """w⁽ⁱ⁾ ← w⁽ⁱ⁾/‖w⁽ⁱ⁾‖ (and its momentum) where ‖w⁽ⁱ⁾‖ > max_norm: the function is unchanged."""
        norm2 = self._norms(params)
        if norm2 is None or not bool((norm2[:-1] > max_norm ** 2).any()):
            return
        factor = torch.where(norm2 > max_norm ** 2, norm2.rsqrt(), torch.ones_like(norm2))
        factor[-1] = 1.0
        for p in params:
            g = self._group_of.get(p)
            if g is not None:
                f = factor[torch.where(g < 0, self.num_groups, g)]
                p.mul_(f)
                buf = self.state[p].get("momentum_buffer")
                if buf is not None:
                    buf.mul_(f)
