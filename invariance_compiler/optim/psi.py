"""PSI-SGD / PSI-SGDM (Yi et al., Algorithm 1): SGD on the positively-scale-invariant manifold.

A PSI weight vector w⁽ⁱ⁾ is the entry set of one normalize generator of the report (the rows that
feed a BatchNorm channel, a LayerNorm's joint scale ...). Its update is
    u ← ρ·u − η·‖w⁽ⁱ⁾‖²·∇w,   w ← w + u
so that starting from T_a(W) gives T_a of the iterates (Theorem 1). Every other entry follows SGD
with momentum. A PSI vector whose norm exceeds `max_norm` (the paper: 1e4) is renormalised to unit
norm together with its momentum, which changes neither the function nor the trajectory's class."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from .scaled import GroupScaledSGD, structure_of

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


class PSISGD(GroupScaledSGD):
    def __init__(self, model: nn.Module, lr: float = 0.1, momentum: float = 0.0,
                 weight_decay: float = 0.0, max_norm: float = 1e4, example_inputs: Any = None,
                 report=None):
        report, names = structure_of(model, report, example_inputs)
        groups = {names[n]: g for n, g in psi_groups(report).items() if n in names}
        super().__init__(model, groups, report.num_generators, lr, momentum, weight_decay, max_norm)
