"""Weight allocation (WA) and its backward, the inverse chain rule (ICR), for a group of tensors.

G-space (DESIGN §3.6, with P_in written directly in path values): for an entry e reading class a
and producing class b,
    W_e = V_e / (P_in[a] · M[b]),   P_in[a] = V_J(a) / M[a]   (carrier J(a); else the constant 1/M[a]),
and the K entries are the fixed values. Backward:
    ∂L/∂V_e    = ∂L/∂W_e / (P_in[a] · M[b])                       (free entries)
    ∂L/∂V_J(a) += -(1 / V_J(a)) · Σ_{free e reading a} ∂L/∂W_e · W_e   (a per-column reduction)
Fixed form: W = V with the K entries overwritten by their fixed values.

`reference` computes the same thing with plain differentiable ops (tests compare the two)."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

__all__ = ["Allocation", "WeightAllocation", "icr", "make_allocation", "reference"]


class Allocation(nn.Module):
    """The allocation plan of one compiled model: per tensor, the classes its entries read/produce
    (compact index maps into M and P_in, `n` meaning none), its fixed entries and its carriers."""

    def __init__(self, form: str, num_classes: int, M: torch.Tensor, plans: Sequence[dict], dtype):
        super().__init__()
        self.form, self.n, self.count = form, num_classes, len(plans)
        self.register_buffer("M", M.to(dtype))
        self.register_buffer("p_in0", (1.0 / M).to(dtype))       # classes without a carrier
        for i, p in enumerate(plans):
            self.register_buffer(f"in{i}", p["inp"])
            self.register_buffer(f"out{i}", p["out"])
            self.register_buffer(f"fixed_idx{i}", p["fixed_idx"])
            self.register_buffer(f"fixed_val{i}", p["fixed_val"].to(dtype))
            self.register_buffer(f"carrier_idx{i}", p["carrier_idx"])
            self.register_buffer(f"carrier_cls{i}", p["carrier_cls"])

    def buf(self, kind: str, i: int) -> torch.Tensor:
        return getattr(self, f"{kind}{i}")

    def p_in(self, vs: Sequence[torch.Tensor]) -> torch.Tensor:
        """P_in (n + 1,): carrier path values divided by M; P_in[n] = 1."""
        p = self.p_in0.clone()
        for i, v in enumerate(vs):
            cls = self.buf("carrier_cls", i)
            if cls.numel():
                p[cls] = v.reshape(-1)[self.buf("carrier_idx", i)] / self.M[cls]
        return p

    def denominator(self, i: int, p_in: torch.Tensor) -> torch.Tensor:
        return p_in[self.buf("in", i)] * self.M[self.buf("out", i)]

    def check(self, p_in: torch.Tensor) -> None:
        if not bool(torch.isfinite(p_in).all()) or bool((p_in == 0).any()):
            bad = (~torch.isfinite(p_in) | (p_in == 0)).nonzero().reshape(-1)[:5].tolist()
            raise FloatingPointError(
                f"weight allocation: the carrier path value of class(es) {bad} is zero or non-finite, "
                f"so the weights it divides are undefined. Lower the learning rate, or export the "
                f"weights (export_state_dict) and compile again to choose new carriers.")

    def forward(self, *vs: torch.Tensor) -> tuple:
        if self.form == "fixed":
            return tuple(_overwrite(v, self.buf("fixed_idx", i), self.buf("fixed_val", i))
                         for i, v in enumerate(vs))
        return WeightAllocation.apply(self, *vs)


def _overwrite(v: torch.Tensor, idx: torch.Tensor, val: torch.Tensor) -> torch.Tensor:
    if idx.numel() == 0:
        return v
    return v.reshape(-1).index_put((idx,), val).view(v.shape)


class WeightAllocation(torch.autograd.Function):
    """G-space WA forward, ICR backward, over every tensor of the model at once."""

    @staticmethod
    def forward(ctx, plan: Allocation, *vs):
        p_in = plan.p_in(vs)
        plan.check(p_in)
        ws = tuple(_overwrite(v / plan.denominator(i, p_in), plan.buf("fixed_idx", i),
                              plan.buf("fixed_val", i)) for i, v in enumerate(vs))
        ctx.plan = plan
        ctx.save_for_backward(p_in, *vs)
        return ws

    @staticmethod
    def backward(ctx, *gws):
        p_in, *vs = ctx.saved_tensors
        return (None, *icr(ctx.plan, p_in, vs, gws))


def icr(plan: Allocation, p_in: torch.Tensor, vs: Sequence[torch.Tensor], gws: Sequence) -> list:
    """∂L/∂V from ∂L/∂W: scale, zero the fixed entries, and add each carrier's share of the
    per-class reduction Σ ∂L/∂W ⊙ W over the free entries reading its class."""
    reduced = torch.zeros_like(p_in)
    gvs = []
    for i, (v, gw) in enumerate(zip(vs, gws)):
        if gw is None:
            gw = torch.zeros_like(v)
        fixed = plan.buf("fixed_idx", i)
        gv = _overwrite(gw / plan.denominator(i, p_in), fixed,
                        torch.zeros((), dtype=gw.dtype).expand(fixed.shape))
        inp = plan.buf("in", i)
        contrib = gv * v                                      # = ∂L/∂W ⊙ W on free entries
        dims = [d for d in range(v.dim()) if inp.shape[d] == 1 and v.shape[d] > 1]
        col = contrib.sum(dim=dims, keepdim=True) if dims else contrib
        reduced.index_add_(0, inp.expand(col.shape).reshape(-1), col.reshape(-1))
        gvs.append(gv)
    for i, (v, gv) in enumerate(zip(vs, gvs)):
        cls = plan.buf("carrier_cls", i)
        if cls.numel():
            idx = plan.buf("carrier_idx", i)
            gv.reshape(-1).index_add_(0, idx, -reduced[cls] / v.reshape(-1)[idx])
    return gvs


def make_allocation(report, sk, weights: dict, form: str, names: Sequence[str], dtype):
    """The allocation plan and the initial parameter tensors for the parameters `names`.
    Returns (Allocation, {name: initial V or free tensor}, [names the allocation covers])."""
    M = sk.out_factor(weights)
    P = sk.in_factor(weights, M) if form == "gspace" else torch.ones_like(M)
    n = sk.num_classes
    init, allocated, plans = {}, [], []
    for name in names:
        ps = sk.params[name]
        inp = torch.where(ps.inp < 0, n, ps.inp)
        out = torch.where(ps.out < 0, n, ps.out)
        w64 = weights[name].detach().to(torch.float64)
        v = w64 * P[inp] * M[out] if form == "gspace" else w64.clone()
        v.reshape(-1)[ps.fixed_idx] = 0.0                      # K positions of V are unused
        init[name] = v.to(dtype)
        trivial = ps.fixed_idx.numel() == 0 and (form == "fixed" or bool((inp == n).all() and (out == n).all()))
        if not trivial:
            allocated.append(name)
            plans.append({"inp": inp, "out": out, "fixed_idx": ps.fixed_idx,
                          "fixed_val": weights[name].detach().reshape(-1)[ps.fixed_idx].clone(),
                          "carrier_idx": ps.carrier_idx, "carrier_cls": ps.carrier_cls})
    return Allocation(form, n, M, plans, dtype), init, allocated


def reference(plan: Allocation, vs: Sequence[torch.Tensor]) -> tuple:
    """The same allocation with plain differentiable ops (autograd gives the ICR)."""
    if plan.form == "fixed":
        return plan(*vs)
    p_in = plan.p_in0
    for i, v in enumerate(vs):
        cls = plan.buf("carrier_cls", i)
        if cls.numel():
            p_in = p_in.index_put((cls,), v.reshape(-1)[plan.buf("carrier_idx", i)] / plan.M[cls])
    return tuple(_overwrite(v / (p_in[plan.buf("in", i)] * plan.M[plan.buf("out", i)]),
                            plan.buf("fixed_idx", i), plan.buf("fixed_val", i)) for i, v in enumerate(vs))
