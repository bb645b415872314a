"""The first paper's symmetry-invariant updates (Badrinarayanan et al., Table 1) and B-SGD's start.

Rows are the weight rows producing a class (a Linear row, a conv filter; across several layers
for a residual stream); columns are the classifier's columns, which consume a class and produce
the output. Both come from the report; biases and normaliser affines follow plain SGD, as in the
paper ("the additional parameters used in Arch2 are updated as proposed in Ioffe & Szegedy").

- SM (scaled metric): rows step by ‖row‖²·∇ (G⁻¹ from the left), columns by ‖column‖²·∇ (from the
  right). Equivariant under the reparametrisations (1)-(3) of the paper.
- UN (unit norm): rows live on the oblique manifold: Π_W(Z) = Z − Diag(diag(Z Wᵀ)) W, then the
  rows are normalised. The constructor moves the model onto the manifold by a group action
  (λ_c = −log‖row_c‖, its consumers compensate), so the function is unchanged."""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn as nn

from ..analyze import analyze
from .scaled import GroupScaledSGD, group_norms, plain_model_only, run_closure, sgd_momentum_, structure_of

__all__ = ["SM", "UN", "row_groups", "balanced_init_"]


def row_groups(report, columns: bool = False) -> dict[str, torch.Tensor]:
    """Per weight (≥ 2-D parameter): the class column each entry's row produces; with
    columns=True, entries producing no class get H + the class they consume (classifier columns)."""
    is_class = torch.tensor([g.kind != "inert" for g in report.generators] + [False])
    h = report.num_generators
    out = {}
    for name in report.param_names:
        if len(report.param_shapes[name]) < 2 or report.is_inert(name):
            continue
        consumed, produced = report.sides(name)
        group = torch.where(is_class[produced], produced, -1)
        if columns:
            shape = torch.broadcast_shapes(group.shape, consumed.shape)
            group = torch.where((group.expand(shape) < 0) & is_class[consumed].expand(shape),
                                h + consumed.expand(shape), group.expand(shape))
        if bool((group >= 0).any()):
            out[name] = group
    return out


class SM(GroupScaledSGD):
    def __init__(self, model: nn.Module, lr: float = 0.01, momentum: float = 0.0,
                 example_inputs: Any = None, report=None):
        report, names = structure_of(model, report, example_inputs)
        groups = {names[n]: g for n, g in row_groups(report, columns=True).items() if n in names}
        super().__init__(model, groups, 2 * report.num_generators, lr, momentum)


class UN(torch.optim.Optimizer):
    """On plain models (it moves the model onto the manifold by a group action when built)."""

    def __init__(self, model: nn.Module, lr: float = 0.01, momentum: float = 0.0,
                 example_inputs: Any = None, report=None):
        if lr <= 0 or not 0 <= momentum < 1:
            raise ValueError("UN: need lr > 0 and 0 <= momentum < 1 (momentum: parameters off the manifold)")
        plain_model_only(model, "UN")
        report = report if report is not None else analyze(model, example_inputs)
        named = dict(model.named_parameters())
        super().__init__(list(named.values()), dict(lr=lr, momentum=momentum))
        self.num_groups = report.num_generators
        self._group_of = {named[n]: g for n, g in row_groups(report).items()}
        with torch.no_grad():                      # onto the manifold, function unchanged
            norm2 = group_norms(list(named.values()), self._group_of, self.num_groups)
            lam = torch.zeros(report.num_generators, dtype=torch.float64)
            lam[:] = -0.5 * norm2[:-1].double().clamp_min(1e-300).log()
            lam[norm2[:-1] == 0] = 0.0
            report.act(model, lam)

    @torch.no_grad()
    def step(self, closure: Optional[Any] = None):
        loss = run_closure(closure)
        lr, mom = self.param_groups[0]["lr"], self.param_groups[0]["momentum"]
        params = [p for p in self.param_groups[0]["params"] if p.grad is not None]
        grads = [p.grad for p in params]
        # diag(Z Wᵀ) per row, then the tangent step, then the retraction
        dots = torch.zeros(self.num_groups + 1, dtype=params[0].dtype, device=params[0].device)
        for p, z in zip(params, grads):
            g = self._group_of.get(p)
            if g is not None:
                ids = g.expand(p.shape).reshape(-1)
                dots.index_add_(0, torch.where(ids < 0, self.num_groups, ids), (z * p).reshape(-1))
        for p, z in zip(params, grads):
            g = self._group_of.get(p)
            if g is None:
                sgd_momentum_(p, self.state[p], lr, mom)
                continue
            inside = g >= 0
            tangent = torch.where(inside, z - dots[torch.where(inside, g, self.num_groups)] * p, z)
            p.add_(tangent, alpha=-lr)
        norm2 = group_norms(params, self._group_of, self.num_groups)
        for p in params:
            g = self._group_of.get(p)
            if g is not None:
                inside = g >= 0
                p.mul_(torch.where(inside, norm2[torch.where(inside, g, self.num_groups)].rsqrt(),
                                   torch.ones((), dtype=p.dtype, device=p.device)))
        return loss


@torch.no_grad()
def balanced_init_(model: nn.Module, generator: Optional[torch.Generator] = None) -> nn.Module:
    """B-SGD's start: every weight (≥ 2-D parameter) drawn from a standard Gaussian, each filter and
    each class vector (row along dim 0) unit-normalised."""
    for p in model.parameters():
        if p.dim() >= 2:
            p.copy_(torch.randn(p.shape, generator=generator, dtype=p.dtype))
            p.div_(p.reshape(p.shape[0], -1).norm(dim=1).reshape(-1, *([1] * (p.dim() - 1))))
    return model
