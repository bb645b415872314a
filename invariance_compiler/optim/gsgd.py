"""G-SGD (Meng et al., Algorithm 1) on a plain model's own weights.

Each step: the inverse chain rule turns ∂L/∂W into ∂L/∂V, SGD (momentum, weight decay) updates
the basis-path values V, and weight allocation writes W = WA(V) back into the model, the skeleton
entries staying fixed. The iterates are the same functions as torch.optim.SGD on the gspace module
of compile_invariant (same skeleton). V lives in the optimizer state, so it survives state_dict()."""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn as nn

from .. import kernels
from ..analyze import analyze
from ..codegen.allocate import allocation_dtype, carrier_grads, make_allocation
from ..skeleton import Skeleton, build_skeleton, check_finite
from .scaled import run_closure

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
        self._cpu = None                    # the fused CPU step of this plan, once built
        self.plan, v0, self.allocated, carriers = make_allocation(
            self.report, skeleton, weights, "gspace", list(named), dtype)
        for n in self.allocated:            # parameters outside the allocation are their own V
            self.state[named[n]]["v"] = v0[n].to(named[n].device).contiguous()
        self._alloc_params = [named[n] for n in self.allocated]
        if self._alloc_params:              # the carriers' path values ride with the first tensor
            self.state[self._alloc_params[0]]["carriers"] = carriers.to(self._alloc_params[0].device)
            self.plan.to(self._alloc_params[0].device)

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
        ps = self._alloc_params
        updates = [(self.state[p], p, p.grad) for p in group["params"]
                   if "v" not in self.state[p] and p.grad is not None]
        if ps:
            self._fused_step(lr, mom, wd)
        for state, v, g in updates:                   # the rest: SGD (torch.optim.SGD's rule)
            d = g.add(v, alpha=wd) if wd else g
            if mom:
                buf = state.get("momentum_buffer")
                if buf is None:
                    buf = state["momentum_buffer"] = d.clone()
                else:
                    buf.mul_(mom).add_(d)
                d = buf
            v.add_(d, alpha=-lr)
        return loss

    def _fused_step(self, lr: float, mom: float, wd: float) -> None:
        """ICR, SGD on V and WA in two passes over the weights with the carriers' O(H) update
        between them. CUDA (kernels/gsgd_step.py): reduce over ∂L/∂W ⊙ W, then V, the momentum
        buffers and W in one pass. CPU (kernels/cpu_step.cpp in one call, or _TorchStep where it
        does not apply): V and the buffers with the reduction in one pass, then W, which saves
        the second read of ∂L/∂W; the C++ step leaves the tensors whose P_in does not depend on
        the carriers to the second pass and steps them there with their W, one pass fewer."""
        plan, ps = self.plan, self._alloc_params
        state0 = self.state[ps[0]]
        c = state0["carriers"]
        # every pass indexes the tensors flat in row-major order: V and the buffers are kept
        # contiguous, and a weight that is not (channels_last) is stepped in a contiguous copy
        dense = torch.contiguous_format
        gws = [p.grad.contiguous() if p.grad is not None else torch.zeros_like(p, memory_format=dense) for p in ps]
        vs, ws = [self.state[p]["v"] for p in ps], [p.contiguous() for p in ps]     # p itself, mostly
        first = mom != 0 and "carriers_momentum" not in state0
        bufs = [self.state[p].setdefault("momentum_buffer", torch.empty_like(p, memory_format=dense))
                for p in ps] if mom else []
        if kernels.use_triton(ps[0]):
            ops, layout, p_old = kernels.ops(), plan.layout(range(len(ps))), plan.path_in(c)
            reduced, g_car = ops.gsgd_reduce(gws, ws, p_old, plan.M, c.numel(), layout, plan.n)
            self._carrier_step(c, reduced, g_car, p_old, lr, mom, wd, first)
            ops.gsgd_update(gws, vs, bufs, ws, p_old, plan.path_in(c), plan.M, c, layout, plan.n,
                            lr, mom, wd, first)
        elif (fused := kernels.cpu_step(plan, gws + vs + ws + bufs + [c, plan.M], self._cpu)) is not None:
            self._cpu = fused
            c_buf = state0.setdefault("carriers_momentum", torch.zeros_like(c)) if mom else None
            fused(gws, vs, bufs, ws, c, c_buf, lr, mom, wd, first)
        else:
            ops, p_old = _TorchStep(plan), plan.path_in(c)
            reduced, g_car = ops.step(gws, vs, bufs, p_old, c, lr, mom, wd, first)
            self._carrier_step(c, reduced, g_car, p_old, lr, mom, wd, first)
            ops.allocate(vs, ws, plan.path_in(c), c)
        for p, w in zip(ps, ws):
            if w is not p:
                p.copy_(w)

    def _carrier_step(self, c, reduced, g_car, p_old, lr, mom, wd, first) -> None:
        """SGD on the carriers' path values, from the per-class reduction Σ ∂L/∂V ⊙ V and their
        direct gradients."""
        g_c = g_car.to(c.dtype) + carrier_grads(self.plan, -reduced.to(c.dtype) / p_old, c)
        d = g_c.add(c, alpha=wd) if wd else g_c
        if mom:
            buf = self.state[self._alloc_params[0]].setdefault("carriers_momentum", torch.zeros_like(c))
            d = buf.copy_(d) if first else buf.mul_(mom).add_(d)
        c.add_(d, alpha=-lr)


class _TorchStep:
    """The two CPU passes of kernels/cpu_step.cpp in PyTorch ops (its reference, and the path for
    other dtypes or where no compiler works), with the same signatures."""

    def __init__(self, plan):
        self.plan = plan

    def step(self, gws, vs, bufs, p_old, carriers, lr, mom, wd, first):
        """V and the momentum buffers in place; returns (reduced (n + 1,): Σ ∂L/∂V ⊙ V per input
        class with the carriers' ∂L/∂c · c, the carriers' direct gradients)."""
        plan = self.plan
        reduced = torch.zeros_like(p_old)
        g_car = carriers.new_zeros(carriers.numel())
        r_old, r_out = 1.0 / p_old, 1.0 / plan.M
        for i, (gw, v) in enumerate(zip(gws, vs)):
            inp = plan.buf("in", i)
            gv = gw * (r_old[inp] * r_out[plan.buf("out", i)])    # ∂L/∂V (V is 0 on the K and J slots)
            if plan.scales_in[i]:
                dims = [d for d in range(v.dim()) if inp.shape[d] == 1 and v.shape[d] > 1]
                col = gv * v
                col = col.sum(dim=dims, keepdim=True) if dims else col
                reduced.index_add_(0, inp.expand(col.shape).reshape(-1), col.reshape(-1))
            j = plan.buf("carrier_idx", i)
            if j.numel():                             # the carriers' direct gradient
                g = gw.reshape(-1)[j] / plan.carrier_denominator(i, p_old)
                cls = plan.buf("carrier_cls", i)
                g_car.index_add_(0, cls, g)
                reduced.index_add_(0, plan.buf("carrier_in", i), g * carriers[cls])
            d = gv.add_(v, alpha=wd) if wd else gv
            if mom:
                d = bufs[i].copy_(d) if first else bufs[i].mul_(mom).add_(d)
            v.add_(d, alpha=-lr)
            for idx in (plan.buf("fixed_idx", i), j):  # fixed and carrier slots are no coordinates
                if idx.numel():
                    v.view(-1)[idx] = 0
                    if mom:
                        bufs[i].view(-1)[idx] = 0
        return reduced, g_car

    def allocate(self, vs, ws, p_new, carriers):
        """W = WA(V) written in place: V / (P_in · M), then the fixed values and c / (P_in · M) in
        their slots (codegen/allocate.py's `reference` computes the same into new tensors, which
        would cost this fallback a temporary and a copy per weight)."""
        plan = self.plan
        for i, (v, w) in enumerate(zip(vs, ws)):
            torch.div(v, plan.denominator(i, p_new), out=w)
            j = plan.buf("carrier_idx", i)
            for idx, val in ((plan.buf("fixed_idx", i), plan.buf("fixed_val", i)),
                             (j, carriers[plan.buf("carrier_cls", i)] / plan.carrier_denominator(i, p_new))):
                if idx.numel():
                    w.view(-1)[idx] = val.to(w.dtype)
