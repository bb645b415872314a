"""The machinery SM and PSI-SGD share: SGD whose gradient on each group of entries (a weight row,
a classifier column, a PSI vector, possibly spanning several parameters) is multiplied by that
group's squared norm. Groups come from a SymmetryReport as compact id tensors per parameter."""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn as nn

from ..kernels.gsgd_step import momentum_

__all__ = ["GroupScaledSGD", "group_norms", "structure_of", "sgd_momentum_", "plain_model_only", "run_closure"]


def run_closure(closure) -> Optional[torch.Tensor]:
    """torch.optim's closure protocol: re-evaluate the loss with gradients on."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


def plain_model_only(model: nn.Module, who: str) -> None:
    """UN and FG-SGD constrain whole weight rows, which a compiled module's fixed entries forbid."""
    from ..codegen import InvariantModule
    if isinstance(model, InvariantModule):
        raise ValueError(f"{who} keeps whole weight rows on a manifold, but a compiled module's fixed "
                         f"entries cannot move: use {who} on the plain model (SM and PSISGD take "
                         f"compiled fixed-form modules)")


def sgd_momentum_(p: torch.Tensor, state: dict, lr: float, momentum: float, weight_decay: float = 0.0) -> None:
    """torch.optim.SGD's step on one parameter (heavy-ball momentum, weight decay): the fallback for
    parameters outside every manifold, or outside G-SGD's allocation."""
    d = p.grad.add(p, alpha=weight_decay) if weight_decay else p.grad
    first = momentum != 0 and "momentum_buffer" not in state
    buf = state.setdefault("momentum_buffer", torch.empty_like(d)) if first else state.get("momentum_buffer")
    p.add_(momentum_(d, buf, momentum, first), alpha=-lr)


def structure_of(model: nn.Module, report, example_inputs) -> tuple:
    """(report, {report parameter name: model parameter name}) for a plain model or a compiled
    fixed-form module (whose parameters are the free entries, in the original shapes)."""
    from ..analyze import analyze
    from ..codegen import InvariantModule
    if isinstance(model, InvariantModule):
        if model.form != "fixed":
            raise ValueError(f"{model.form} modules hold path values, not weights: use torch.optim on "
                             f"them (SGD there is G-SGD) or compile with form='fixed'")
        return model.report, model.parameter_names()
    report = report if report is not None else analyze(model, example_inputs)
    return report, {n: n for n in report.param_names}


def group_norms(params, group_of: dict, num_groups: int, values=None) -> Optional[torch.Tensor]:
    """Σ over each group of values² (values: the parameters themselves by default); the last slot
    collects entries outside every group."""
    out = None
    for i, p in enumerate(params):
        g = group_of.get(p)
        if g is None:
            continue
        x = (p if values is None else values[i]).detach()
        if out is None:
            out = torch.zeros(num_groups + 1, dtype=p.dtype, device=p.device)
        ids = g.expand(p.shape).reshape(-1)
        out.index_add_(0, torch.where(ids < 0, num_groups, ids), x.reshape(-1) ** 2)
    return out


class GroupScaledSGD(torch.optim.Optimizer):
    """u ← ρu − η‖w_G‖²∇w on grouped entries, u ← ρu − η(∇w + decay·w) elsewhere; w ← w + u.
    Groups whose norm exceeds max_norm are renormalised (with their momentum) after the step."""

    def __init__(self, model: nn.Module, groups: dict[str, torch.Tensor], num_groups: int, lr: float,
                 momentum: float = 0.0, weight_decay: float = 0.0, max_norm: float = float("inf")):
        if lr <= 0 or not 0 <= momentum < 1 or weight_decay < 0 or max_norm <= 0:
            raise ValueError(f"{type(self).__name__}: need lr > 0, 0 <= momentum < 1, "
                             f"weight_decay >= 0 (ungrouped entries only), max_norm > 0")
        named = dict(model.named_parameters())
        super().__init__(list(named.values()), dict(lr=lr, momentum=momentum,
                                                    weight_decay=weight_decay, max_norm=max_norm))
        self.num_groups = num_groups
        self._group_of = {named[n]: g.to(named[n].device) for n, g in groups.items() if n in named}

    @torch.no_grad()
    def step(self, closure: Optional[Any] = None):
        loss = run_closure(closure)
        group = self.param_groups[0]
        lr, mom, wd, max_norm = group["lr"], group["momentum"], group["weight_decay"], group["max_norm"]
        params = [p for p in group["params"] if p.grad is not None]
        norm2 = group_norms(params, self._group_of, self.num_groups)
        for p in params:
            g = self._group_of.get(p)
            d = p.grad
            if g is None:
                d = d.add(p, alpha=wd) if wd else d
            else:
                outside = g < 0
                d = d * torch.where(outside, torch.ones((), dtype=p.dtype, device=p.device),
                                    norm2[torch.where(outside, self.num_groups, g)])
                if wd:
                    d = d + wd * torch.where(outside, p, torch.zeros((), dtype=p.dtype, device=p.device))
            if mom:
                buf = self.state[p].get("momentum_buffer")
                if buf is None:
                    buf = self.state[p]["momentum_buffer"] = (-lr * d).clone()
                else:
                    buf.mul_(mom).add_(d, alpha=-lr)
                p.add_(buf)
            else:
                p.add_(d, alpha=-lr)
        if max_norm != float("inf"):
            self._renormalise(params, max_norm)
        return loss

    def _renormalise(self, params, max_norm):
        """w_G ← w_G/‖w_G‖ (and its momentum) where ‖w_G‖ > max_norm."""
        norm2 = group_norms(params, self._group_of, self.num_groups)
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
