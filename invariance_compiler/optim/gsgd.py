"""G-SGD (Meng et al., Algorithm 1) on a plain model's own weights.

Each step: the inverse chain rule turns ∂L/∂W into ∂L/∂V, SGD (momentum, weight decay) updates
the basis-path values V, and weight allocation writes W = WA(V) back into the model, the skeleton
entries staying fixed. The iterates are the same functions as torch.optim.SGD on the gspace module
of compile_invariant(..., coordinates="paths") (same skeleton). V lives in the optimizer state, so it
survives state_dict()."""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn as nn

from ..kernels.gsgd_step import GSGDStep, StepPlan
from ..analyze import analyze
from ..codegen.allocate import allocation_dtype, make_allocation
from ..skeleton import Skeleton, build_skeleton, check_finite
from .scaled import run_closure, sgd_momentum_

__all__ = ["GSGD"]


class GSGD(torch.optim.Optimizer):
    def __init__(self, model: nn.Module, lr: float = 1e-2, momentum: float = 0.0,
                 weight_decay: float = 0.0, example_inputs: Any = None, report=None, skeleton=None):
        if lr <= 0 or momentum < 0 or weight_decay < 0:
            raise ValueError(f"GSGD: need lr > 0, momentum >= 0, weight_decay >= 0 "
                             f"(got {lr}, {momentum}, {weight_decay})")
        self.report = report if report is not None else analyze(model, example_inputs)
        self._named = dict(model.named_parameters())
        super().__init__(list(self._named.values()), dict(lr=lr, momentum=momentum, weight_decay=weight_decay))
        weights = {n: p.detach().cpu() for n, p in self._named.items()}
        self._setup(skeleton if skeleton is not None else build_skeleton(self.report, weights))

    def _setup(self, skeleton) -> None:
        """Plan and initial path values from the model's weights under `skeleton` (its fixed
        entries never move, so a resumed run rebuilds the same plan from the saved skeleton)."""
        named = self._named
        weights = {n: p.detach().cpu() for n, p in named.items()}
        check_finite(weights, "GSGD")
        dtype = allocation_dtype(named.values())
        self.skeleton = skeleton
        self.plan, v0, self.allocated, carriers = make_allocation(
            self.report, skeleton, weights, "gspace", list(named), dtype)
        for n in self.allocated:            # parameters outside the allocation are their own V
            self.state[named[n]]["v"] = v0[n].to(named[n].device).contiguous()
        self._alloc_params = [named[n] for n in self.allocated]
        if self._alloc_params:              # the carriers' path values ride with the first tensor
            self.state[self._alloc_params[0]]["carriers"] = carriers.to(self._alloc_params[0].device)
            self.plan.to(self._alloc_params[0].device)
        plan = self.plan
        self._step = GSGDStep(StepPlan(plan.group(range(plan.count)), plan.M, plan.path_scale, plan.path_root,
                                       plan.scales_in, plan.path_in))

    @property
    def backend(self) -> str | None:
        """Which backend ran the last step of the allocated weights: 'Triton', 'C++' or 'PyTorch'."""
        return self._step.backend

    def state_dict(self):
        out = super().state_dict()
        out["skeleton"] = self.skeleton.state()
        return out

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        sk = state_dict.pop("skeleton", None)
        if sk is not None:
            self._setup(Skeleton.from_state(self.report, sk))
        super().load_state_dict(state_dict)

    @torch.no_grad()
    def step(self, closure: Optional[Any] = None):
        loss = run_closure(closure)
        group = self.param_groups[0]
        lr, mom, wd = group["lr"], group["momentum"], group["weight_decay"]
        if self._alloc_params:
            self._fused_step(lr, mom, wd)
        for p in group["params"]:                     # the rest: SGD (torch.optim.SGD's rule)
            if "v" not in self.state[p] and p.grad is not None:
                sgd_momentum_(p, self.state[p], lr, mom, wd)
        return loss

    def _fused_step(self, lr: float, mom: float, wd: float) -> None:
        """ICR, SGD on V and WA on the allocated weights, with the carriers' O(H) update between
        (kernels/gsgd_step.py: the passes, and which backend runs them)."""
        ps = self._alloc_params
        state0 = self.state[ps[0]]
        c = state0["carriers"]
        # every pass indexes the tensors flat in row-major order: V and the buffers are kept
        # contiguous, and a weight that is not (channels_last) is stepped in a contiguous copy
        dense = torch.contiguous_format
        gws = [p.grad.contiguous() if p.grad is not None else torch.zeros_like(p, memory_format=dense) for p in ps]
        vs, ws = [self.state[p]["v"] for p in ps], [p.contiguous() for p in ps]     # p itself, mostly
        first = mom != 0 and "carriers_momentum" not in state0
        bufs = [_buffer(self.state[p], "momentum_buffer", p, memory_format=dense) for p in ps] if mom else []
        c_buf = state0.setdefault("carriers_momentum", torch.zeros_like(c)) if mom else None
        self._step(gws, vs, bufs, ws, c, c_buf, lr, mom, wd, first)
        self._hold_relations(vs, bufs, ws, c)
        for p, w in zip(ps, ws):
            if w is not p:
                p.copy_(w)

    def _hold_relations(self, vs, bufs, ws, c) -> None:
        """A relation generator's fixed entry is a constant coordinate (DESIGN §3.6c), which the
        fused passes update like any other: put V back, clear its momentum, and write its weight
        from the new P_in (a few entries; the gspace module's ICR zeroes their gradient instead)."""
        plan = self.plan
        p_in = None
        for i, t in enumerate(plan.tensors):
            idx = t.rel_idx
            if not idx.numel():
                continue
            if p_in is None:
                p_in = plan.path_in(c)
            vs[i].view(-1)[idx] = t.rel_val.to(vs[i].dtype)
            if bufs:
                bufs[i].view(-1)[idx] = 0
            inp = t.inp.expand(plan.shapes[i]).reshape(-1)[idx]
            out = t.out.expand(plan.shapes[i]).reshape(-1)[idx]
            ws[i].view(-1)[idx] = (t.rel_val / (p_in[inp] * plan.M[out])).to(ws[i].dtype)


def _buffer(state: dict, key: str, like: torch.Tensor, **kwargs) -> torch.Tensor:
    """state[key], made (uninitialised: the first step writes it) only when missing."""
    buf = state.get(key)
    if buf is None:
        buf = state[key] = torch.empty_like(like, **kwargs)
    return buf
