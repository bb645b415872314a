"""Weight allocation (WA) and its backward, the inverse chain rule (ICR), for a group of tensors.

G-space (DESIGN §3.6, with P_in written directly in path values): for an entry e reading class a
and producing class b,
    W_e = V_e / (P_in[a] · M[b]),   P_in[a] = V_J(a) / M[a]   (carrier J(a); else the constant 1/M[a]),
and the K entries are the fixed values. Backward (ICR):
    ∂L/∂V_e     = ∂L/∂W_e / (P_in[a] · M[b])                      (free entries; 0 on K)
    ∂L/∂P_in[a] = -(1 / P_in[a]) · Σ_{free e reading a} ∂L/∂W_e · W_e   (a per-column reduction)
and ∂L/∂P_in reaches the carriers through `path_in` (an H-sized gather): ∂L/∂V_J(a) += ∂L/∂P_in[a] / M[a].

A Linear layer need not materialise W at all: x @ Wᵀ = ((x / P_in) @ Vᵀ) / M + (the K entries' terms),
so `linear` scales the (smaller) activations and autograd gives the ICR (the carrier term becomes
Σ_batch x ⊙ ∂L/∂x). Fixed form: W = V with the K entries overwritten by their fixed values.

`reference` computes the allocation with plain differentiable ops (tests compare)."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["Allocation", "WeightAllocation", "icr", "make_allocation", "reference"]


class Allocation(nn.Module):
    """The allocation plan of one compiled model. Tensor i (in plan order) has compact index maps
    into M and P_in (`n` meaning no class), its fixed entries and its carriers. `wa` lists the
    tensors allocated by WA; the others are Linear weights used through `linear`."""

    def __init__(self, form: str, num_classes: int, M: torch.Tensor, plans: Sequence[dict], dtype,
                 wa: Sequence[int], chain: Sequence[tuple] = ()):
        super().__init__()
        # classes whose carrier is a fixed entry: P_in[c] = value · P_in[src], round by round
        self.chain_rounds = len(chain)
        for r, (cls, src, val) in enumerate(chain):
            self.register_buffer(f"chain_cls{r}", cls)
            self.register_buffer(f"chain_src{r}", src)
            self.register_buffer(f"chain_val{r}", val.to(dtype))
        self.form, self.n, self.count, self.wa = form, num_classes, len(plans), list(wa)
        # sides with no class at all (network input, output) need no scaling, and must not make
        # autograd differentiate through them (a first layer would pay for an input-gradient mm)
        self.scales_in = [bool((p["inp"] < num_classes).any()) for p in plans]
        self.scales_out = [bool((p["out"] < num_classes).any()) for p in plans]
        self.register_buffer("M", M.to(dtype))
        self.register_buffer("p_in0", (1.0 / M).to(dtype))       # classes without a carrier
        for i, p in enumerate(plans):
            self.register_buffer(f"in{i}", p["inp"])
            self.register_buffer(f"out{i}", p["out"])
            self.register_buffer(f"fixed_idx{i}", p["fixed_idx"])
            self.register_buffer(f"fixed_val{i}", p["fixed_val"].to(dtype))
            self.register_buffer(f"carrier_idx{i}", p["carrier_idx"])
            self.register_buffer(f"carrier_cls{i}", p["carrier_cls"])
            flat_in = p["inp"].expand(p["shape"]).reshape(-1)[p["fixed_idx"]]   # classes of the K entries
            flat_out = p["out"].expand(p["shape"]).reshape(-1)[p["fixed_idx"]]
            self.register_buffer(f"fixed_in{i}", flat_in)
            self.register_buffer(f"fixed_out{i}", flat_out)

    def buf(self, kind: str, i: int) -> torch.Tensor:
        return getattr(self, f"{kind}{i}")

    def path_in(self, *vs: torch.Tensor) -> torch.Tensor:
        """P_in (n + 1,) from all plan tensors: free carriers give V_J / M, fixed carriers extend
        their source's path by a constant (in rounds from the input); P_in[n] = 1. Differentiable:
        its backward is the H-sized accumulation of the ICR along the carrier chains."""
        p = self.p_in0
        for i, v in enumerate(vs):
            cls = self.buf("carrier_cls", i)
            if cls.numel():
                p = p.index_put((cls,), v.reshape(-1)[self.buf("carrier_idx", i)] / self.M[cls])
        for r in range(self.chain_rounds):
            cls = self.buf("chain_cls", r)
            p = p.index_put((cls,), self.buf("chain_val", r) * p[self.buf("chain_src", r)])
        if not torch.compiler.is_compiling():
            _check(p)
        return p

    def denominator(self, i: int, p_in: torch.Tensor) -> torch.Tensor:
        return p_in[self.buf("in", i)] * self.M[self.buf("out", i)]

    def forward(self, p_in: torch.Tensor, *vs: torch.Tensor) -> tuple:
        """Weights of the `wa` tensors (fixed form: p_in is ignored)."""
        if self.form == "fixed":
            return tuple(_overwrite(v, self.buf("fixed_idx", i), self.buf("fixed_val", i))
                         for i, v in zip(self.wa, vs))
        return WeightAllocation.apply(self, p_in, *vs)

    def linear(self, x: torch.Tensor, v: torch.Tensor, bias, p_in: torch.Tensor, i: int, j: int) -> torch.Tensor:
        """F.linear(x, W_i, b_j) without forming W_i: W = D_out⁻¹ V' D_in⁻¹, so scale x by 1/P_in and
        the output by 1/M. V' is V with each fixed slot holding w_K·P_in·M; in the same units the
        bias is its own path value V_j (its fixed slots: w_K·M)."""
        idx = self.buf("fixed_idx", i)
        k = self.buf("fixed_val", i) * p_in[self.buf("fixed_in", i)] * self.M[self.buf("fixed_out", i)]
        if bias is not None and j >= 0 and self.buf("fixed_idx", j).numel():
            bias = _overwrite(bias, self.buf("fixed_idx", j),
                              self.buf("fixed_val", j) * self.M[self.buf("fixed_out", j)])
        r_in = (1.0 / p_in[self.buf("in", i)]).reshape(-1) if self.scales_in[i] else None
        r_out = (1.0 / self.M[self.buf("out", i)]).reshape(-1) if self.scales_out[i] else None
        return _ScaledLinear.apply(x, v, bias, r_in, r_out, k, idx)


class _ScaledLinear(torch.autograd.Function):
    """y = ((x ⊙ r_in) @ V'ᵀ + b) ⊙ r_out, V' = V with its slots `idx` (fixed entries, carriers:
    not coordinates of V) set to k. The gradient landing on those slots goes to k (it depends on
    P_in and the carrier values); V's own gradient there is zero, set in place."""

    @staticmethod
    def forward(ctx, x, v, bias, r_in, r_out, k, idx):
        if idx.numel():
            v = v.reshape(-1).index_put((idx,), k.to(v.dtype)).view(v.shape)
        xs = x * r_in if r_in is not None else x
        y = F.linear(xs, v, bias)
        if r_out is not None:
            y = y * r_out
        ctx.save_for_backward(x, xs, v, r_in, r_out, idx)
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, gy):
        x, xs, v, r_in, r_out, idx = ctx.saved_tensors
        g = gy * r_out if r_out is not None else gy                       # (…, out)
        g2, xs2 = g.reshape(-1, g.shape[-1]), xs.reshape(-1, xs.shape[-1])
        grad_v = g2.t() @ xs2                                             # (out, in), fresh
        flat = grad_v.view(-1)
        grad_k = flat[idx].clone() if idx.numel() else None
        if idx.numel():
            flat[idx] = 0                                                 # not coordinates
        grad_xs = g @ v
        grad_x = grad_xs * r_in if r_in is not None else grad_xs
        grad_r_in = None
        if r_in is not None and ctx.needs_input_grad[3]:
            grad_r_in = (grad_xs * x).reshape(-1, x.shape[-1]).sum(0)
        grad_b = g2.sum(0) if ctx.has_bias else None
        return grad_x, grad_v, grad_b, grad_r_in, None, grad_k, None


def _check(p_in: torch.Tensor) -> None:
    if not bool(torch.isfinite(p_in).all()) or bool((p_in == 0).any()):
        bad = (~torch.isfinite(p_in) | (p_in == 0)).nonzero().reshape(-1)[:5].tolist()
        raise FloatingPointError(
            f"weight allocation: the carrier path value of class(es) {bad} is zero or non-finite, "
            f"so the weights it divides are undefined. Lower the learning rate, or export the "
            f"weights (export_state_dict) and compile again to choose new carriers.")


def _overwrite(v: torch.Tensor, idx: torch.Tensor, val: torch.Tensor) -> torch.Tensor:
    if idx.numel() == 0:
        return v
    return v.reshape(-1).index_put((idx,), val).view(v.shape)


class WeightAllocation(torch.autograd.Function):
    """G-space WA forward, ICR backward, over the plan's `wa` tensors at once."""

    @staticmethod
    def forward(ctx, plan: Allocation, p_in, *vs):
        ws = []
        for i, v in zip(plan.wa, vs):
            w = v / plan.denominator(i, p_in)
            idx = plan.buf("fixed_idx", i)
            if idx.numel():
                w.view(-1)[idx] = plan.buf("fixed_val", i)    # a fresh tensor: in place is O(H)
            ws.append(w)
        ctx.plan = plan
        ctx.save_for_backward(p_in, *vs)
        return tuple(ws)

    @staticmethod
    def backward(ctx, *gws):
        p_in, *vs = ctx.saved_tensors
        gvs, g_p_in = icr(ctx.plan, p_in, vs, gws, ctx.plan.wa)
        return (None, g_p_in, *gvs)


def icr(plan: Allocation, p_in: torch.Tensor, vs: Sequence[torch.Tensor], gws: Sequence,
        index: Sequence[int]) -> tuple[list, torch.Tensor]:
    """∂L/∂V (scaled, 0 on K) and ∂L/∂P_in (the per-class reduction) from ∂L/∂W."""
    reduced = torch.zeros_like(p_in)                          # Σ ∂L/∂W ⊙ W per class read
    gvs = []
    for i, v, gw in zip(index, vs, gws):
        if gw is None:
            gw = torch.zeros_like(v)
        gv = gw / plan.denominator(i, p_in)
        fixed = plan.buf("fixed_idx", i)
        if fixed.numel():
            gv.view(-1)[fixed] = 0
        inp = plan.buf("in", i)
        contrib = gv * v                                      # = ∂L/∂W ⊙ W on free entries
        dims = [d for d in range(v.dim()) if inp.shape[d] == 1 and v.shape[d] > 1]
        col = contrib.sum(dim=dims, keepdim=True) if dims else contrib
        reduced.index_add_(0, inp.expand(col.shape).reshape(-1), col.reshape(-1))
        gvs.append(gv)
    return gvs, -reduced / p_in


def carrier_grads(plan: Allocation, g_p_in: torch.Tensor, vs: Sequence[torch.Tensor],
                  gvs: Sequence[torch.Tensor]) -> None:
    """Add ∂L/∂P_in's share to the carrier entries (the backward of path_in), in place."""
    with torch.enable_grad():
        req = [v.detach().requires_grad_(True) for v in vs]
        shares = torch.autograd.grad(plan.path_in(*req), req, g_p_in, allow_unused=True)
    for gv, share in zip(gvs, shares):
        if share is not None:
            gv.add_(share)


def make_allocation(report, sk, weights: dict, form: str, names: Sequence[str], dtype,
                    linear: dict | None = None):
    """The allocation plan and the initial parameter tensors for the parameters `names`; the
    weights in `linear` (gspace; weight name -> bias name or None) and their biases are used
    through Allocation.linear instead of WA.
    Returns (Allocation, {name: initial V or free tensor}, [names in plan order])."""
    M = sk.out_factor(weights)
    P = sk.in_factor(weights, M) if form == "gspace" else torch.ones_like(M)
    n = sk.num_classes
    init, planned, plans, wa = {}, [], [], []
    linear = dict(linear or {}) if form == "gspace" else {}     # weight name -> its bias name (or None)
    in_linear = set(linear) | {b for b in linear.values() if b}
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
            if name not in in_linear:
                wa.append(len(planned))
            planned.append(name)
            plans.append({"inp": inp, "out": out, "fixed_idx": ps.fixed_idx, "shape": ps.shape,
                          "fixed_val": weights[name].detach().reshape(-1)[ps.fixed_idx].clone(),
                          "carrier_idx": ps.carrier_idx, "carrier_cls": ps.carrier_cls})
    chain = []
    if form == "gspace":
        fixed = sk.carrier_fixed & (sk.carrier_round >= 0)
        vals = sk._values(weights, sk.carrier_param, sk.carrier_entry)
        for r in range(int(sk.carrier_round.max()) + 1 if n else 0):
            cls = (fixed & (sk.carrier_round == r)).nonzero().reshape(-1)
            if cls.numel():
                chain.append((cls, torch.where(sk.carrier_src[cls] < 0, n, sk.carrier_src[cls]), vals[cls]))
    return Allocation(form, n, M, plans, dtype, wa, chain), init, planned


def reference(plan: Allocation, vs: Sequence[torch.Tensor]) -> tuple:
    """Every plan tensor's weight with plain differentiable ops (autograd gives the ICR)."""
    if plan.form == "fixed":
        return tuple(_overwrite(v, plan.buf("fixed_idx", i), plan.buf("fixed_val", i))
                     for i, v in enumerate(vs))
    p_in = plan.path_in(*vs)
    return tuple(_overwrite(v / plan.denominator(i, p_in), plan.buf("fixed_idx", i), plan.buf("fixed_val", i))
                 for i, v in enumerate(vs))
