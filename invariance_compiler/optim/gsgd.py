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
from ..codegen.allocate import carrier_grads, make_allocation
from ..codegen.module import _check_finite, _float_dtype
from ..skeleton import Skeleton, build_skeleton
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
        _check_finite(weights, "GSGD")
        dtype = _float_dtype(named.values())
        self.skeleton = skeleton
        self.plan, v0, self.allocated, carriers = make_allocation(
            self.report, skeleton, weights, "gspace", list(named), dtype)
        for n in self.allocated:            # parameters outside the allocation are their own V
            self.state[named[n]]["v"] = v0[n].to(named[n].device)
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
        """ICR, SGD on V and WA in two passes (kernels/gsgd_step.py; Triton on CUDA, the same in
        PyTorch on CPU): reduce, then the carriers' O(H) update, then V, the momentum buffers and
        the weights in place."""
        plan, ps = self.plan, self._alloc_params
        triton = kernels.use_triton(ps[0])
        ops = kernels.ops() if triton else _TorchStep(plan)
        layout = plan.layout(range(len(ps))) if triton else None
        state0 = self.state[ps[0]]
        c = state0["carriers"]
        gws = [p.grad.contiguous() if p.grad is not None else torch.zeros_like(p) for p in ps]
        p_old = plan.path_in(c)
        reduced, g_car = ops.gsgd_reduce(gws, [p.data for p in ps], p_old, plan.M, c.numel(), layout, plan.n)
        g_c = g_car.to(c.dtype) + carrier_grads(plan, -reduced.to(c.dtype) / p_old, c)
        d = g_c.add(c, alpha=wd) if wd else g_c             # SGD on the carriers' path values
        first = mom != 0 and "carriers_momentum" not in state0
        if mom:
            buf = state0.setdefault("carriers_momentum", torch.zeros_like(c))
            d = buf.copy_(d) if first else buf.mul_(mom).add_(d)
        c.add_(d, alpha=-lr)
        bufs = []
        if mom:
            bufs = [self.state[p].setdefault("momentum_buffer", torch.empty_like(p)) for p in ps]
        ops.gsgd_update(gws, [self.state[p]["v"] for p in ps], bufs, [p.data for p in ps], p_old,
                        plan.path_in(c), plan.M, c, layout, plan.n, lr, mom, wd, first)


class _TorchStep:
    """The two passes of kernels/gsgd_step.py in PyTorch (CPU tensors), with the same signatures."""

    def __init__(self, plan):
        self.plan = plan

    def gsgd_reduce(self, gws, ws, p_in, M, num_carriers, layout, n):
        plan = self.plan
        reduced = torch.zeros_like(p_in)
        g_car = p_in.new_zeros(num_carriers)
        for i, (gw, w) in enumerate(zip(gws, ws)):
            inp = plan.buf("in", i)
            if plan.scales_in[i]:                     # Σ ∂L/∂W ⊙ W per input class
                dims = [d for d in range(w.dim()) if inp.shape[d] == 1 and w.shape[d] > 1]
                col = torch.mul(gw, w)
                col = col.sum(dim=dims, keepdim=True) if dims else col
                reduced.index_add_(0, inp.expand(col.shape).reshape(-1), col.reshape(-1))
            gwf, wf = gw.reshape(-1), w.reshape(-1)
            k, j = plan.buf("fixed_idx", i), plan.buf("carrier_idx", i)
            if k.numel():                             # fixed entries are no coordinates
                reduced.index_add_(0, plan.buf("fixed_in", i), -(gwf[k] * wf[k]))
            if j.numel():                             # the carriers' direct gradient
                g_car.index_add_(0, plan.buf("carrier_cls", i), gwf[j] / plan.carrier_denominator(i, p_in))
        return reduced, g_car

    def gsgd_update(self, gws, vs, bufs, ws, p_old, p_new, M, carriers, layout, n, lr, mom, wd, first):
        plan = self.plan
        r_old, r_new, r_out = 1.0 / p_old, 1.0 / p_new, 1.0 / M
        for i, (gw, v, w) in enumerate(zip(gws, vs, ws)):
            inp, out = plan.buf("in", i), plan.buf("out", i)
            s_old = r_old[inp] * r_out[out]           # 1 / den: ∂L/∂V = ∂L/∂W ⊙ s_old
            if mom:
                buf = bufs[i]
                if first:
                    torch.mul(gw, s_old, out=buf)
                else:
                    buf.mul_(mom).addcmul_(gw, s_old)
                if wd:
                    buf.add_(v, alpha=wd)
                v.add_(buf, alpha=-lr)
            elif wd:
                v.add_(torch.mul(gw, s_old).add_(v, alpha=wd), alpha=-lr)
            else:
                v.addcmul_(gw, s_old, value=-lr)
            torch.mul(v, r_new[inp] * r_out[out], out=w)               # WA
            k, j = plan.buf("fixed_idx", i), plan.buf("carrier_idx", i)
            slots = [(k, plan.buf("fixed_val", i))]
            if j.numel():
                slots.append((j, carriers[plan.buf("carrier_cls", i)] / plan.carrier_denominator(i, p_new)))
            for idx, val in slots:
                if idx.numel():
                    w.view(-1)[idx] = val.to(w.dtype)
                    for t in (v, bufs[i] if mom else None):
                        if t is not None:
                            t.view(-1)[idx] = 0
