"""The product of a scaled layer (a fast Linear or convolution of the gspace module, DESIGN §3.6):
y = ((x ⊙ r_in) ∗ V'ᵀ + b') ⊙ r_out as one autograd node, W never formed."""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.nn.functional as F

from .forms import fill as _fill

__all__ = ["ScaledProduct"]


class ScaledProduct(torch.autograd.Function):
    """y = ((x ⊙ r_in) ∗ V'ᵀ + b') ⊙ r_out, `scales` = [r_in | k | kb] (Allocation.linear_scales),
    where ∗ is F.linear (with `transposed`, V is stored (in, out), as transformers' Conv1D keeps
    it: y = xs @ V' + b'), or with `conv` = (stride, padding, dilation) a convolution (r_in and r_out
    per channel): V' is V with its slots (fixed entries, carriers: not coordinates of V) holding k,
    b' likewise with kb (times the constant `b_scale`, where the bias has relation units of its
    own: GPT-2's key bias). The slots are kept in V's (and b's) own storage (forms.fill), which
    saves a copy of V per forward; `held`: k are constants of the chart (scaled coordinates),
    written on every eager call without bumping V's version and read in place by a compiled one,
    else (raw path values) rewritten only when k changed. The gradient landing on the slots goes to
    k (and on through autograd to P_in and the carriers); V's own gradient there is zero, so no
    optimizer moves them on purpose.
    Eager mode pays for every op and every new tensor of this node once per layer and step, so
    backward writes into one gradient vector and reuses its buffers (DESIGN §4c)."""

    @staticmethod
    def forward(ctx, x, v, bias, scales, sizes, r_out, slot, b_slot=None, conv=None, transposed=False,
                b_scale=None, held=False):
        r_in, k, kb = scales.split(sizes)
        if v.is_contiguous() or (held and torch.compiler.is_compiling()):
            v = _fill(v, slot, k, held)
        else:                        # (channels_last) the slots are row-major: fill a contiguous copy
            v = v.contiguous()
            v.view(-1).index_copy_(0, slot, k.to(v.dtype))
        if b_slot is not None:
            bias = _fill(bias, b_slot, kb, held)
        if b_scale is not None:                # a bias with relation units of its own: to the rows'
            bias = bias * b_scale
        r_in = r_in if sizes[0] else None
        nd = v.dim() - 2
        unbatched = conv is not None and x.dim() == nd + 1
        if unbatched:
            x = x.unsqueeze(0)
        if conv is not None:                               # r_in, r_out along x's and y's channels
            along = (-1,) + (1,) * nd
            r_in = r_in.view(along) if r_in is not None else None
            r_out = r_out.view(along) if r_out is not None else None
        xs = x * r_in if r_in is not None else x
        # under autocast the product runs in its dtype: cast here, once, and keep the cast operands
        # for backward, so that forward and backward multiply the same numbers (DESIGN §4c)
        kind = x.device.type
        low = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else None
        xc, vc = (xs.to(low), v.to(low)) if low is not None else (xs, v)
        bc = bias.to(low) if low is not None and bias is not None else bias
        with torch.autocast(kind, enabled=False) if low is not None else contextlib.nullcontext():
            y = F.linear(xc, vc.t() if transposed else vc, bc) if conv is None else \
                torch.convolution(xc, vc, bc, *conv, False, (0,) * nd, 1)
        if r_out is not None:
            y.mul_(r_out)                                                 # y is ours: in place
        ctx.save_for_backward(x, xc, vc, r_in, r_out, slot, b_slot, b_scale)
        ctx.has_bias, ctx.sizes, ctx.conv, ctx.unbatched = bias is not None, sizes, conv, unbatched
        ctx.transposed = transposed
        ctx.dtypes = (x.dtype, v.dtype, bias.dtype if bias is not None else None, scales.dtype)
        return y.squeeze(0) if unbatched else y

    @staticmethod
    def backward(ctx, gy):
        x, xs, v, r_in, r_out, slot, b_slot, b_scale = ctx.saved_tensors
        x_dtype, v_dtype, b_dtype, s_dtype = ctx.dtypes
        n_r, n_k, n_kb = ctx.sizes
        if ctx.unbatched:
            gy = gy.unsqueeze(0)
        g = gy * r_out if r_out is not None else gy                       # (…, out) or (B, out, …)
        g = _as(g, v.dtype)                                               # the product's dtype
        need_x = ctx.needs_input_grad[0] or r_in is not None             # a first layer needs neither
        if ctx.conv is None:
            g2, xs2 = g.reshape(-1, g.shape[-1]), xs.reshape(-1, xs.shape[-1])
            # V's own layout, fresh: (out, in), or (in, out) when transposed
            grad_v = _as(xs2.t() @ g2 if ctx.transposed else g2.t() @ xs2, v_dtype)
            grad_b = _as(g2.sum(0), b_dtype) if ctx.has_bias else None
            grad_xs = (g @ (v.t() if ctx.transposed else v)) if need_x else None
        else:
            nd = v.dim() - 2
            grad_xs, grad_v, grad_b = torch.ops.aten.convolution_backward(
                g, xs, v, [v.shape[0]] if ctx.has_bias else None, *ctx.conv, False, [0] * nd, 1,
                [need_x, True, ctx.has_bias])
            grad_v, grad_b = _as(grad_v.contiguous(), v_dtype), _as(grad_b, b_dtype)
        # one vector [∂r_in | ∂k | ∂kb], written in place by each part (no cat)
        grad_scales = g.new_empty(n_r + n_k + n_kb, dtype=s_dtype) if ctx.needs_input_grad[3] else None
        flat = grad_v.view(-1)
        if n_k:                                        # the slots' gradient goes to k, not to V
            if grad_scales is not None:
                _take(flat, slot, grad_scales[n_r:n_r + n_k])
            flat.index_fill_(0, slot, 0)
        if b_slot is not None and n_kb:
            if grad_scales is not None:
                _take(grad_b, b_slot, grad_scales[n_r + n_k:])
            grad_b.index_fill_(0, b_slot, 0)
        if b_scale is not None and grad_b is not None:              # (1 at the slots)
            grad_b = grad_b * b_scale
        grad_x = None
        if grad_xs is not None:
            if ctx.needs_input_grad[0]:
                grad_x = _as(grad_xs * r_in if r_in is not None else grad_xs, x_dtype)
                if ctx.unbatched:
                    grad_x = grad_x.squeeze(0)
            if r_in is not None and grad_scales is not None:
                # ∂r_in = Σ ∂xs ⊙ x over all but the channels, in grad_xs's own storage (no new
                # activation-sized tensor)
                prod = grad_xs.mul_(x) if grad_xs.dtype == x.dtype else grad_xs * x
                grad_scales[:n_r] = prod.reshape(-1, x.shape[-1]).sum(0) if ctx.conv is None else \
                    prod.sum([d for d in range(prod.dim()) if d != 1])
        return grad_x, grad_v, grad_b, grad_scales, None, None, None, None, None, None, None, None


def _as(t: Optional[torch.Tensor], dtype) -> Optional[torch.Tensor]:
    return t if t is None or t.dtype == dtype else t.to(dtype)


def _take(src: torch.Tensor, idx: torch.Tensor, out: torch.Tensor) -> None:
    """out[:] = src[idx], in out's storage when the dtypes agree."""
    if out.dtype == src.dtype:
        torch.index_select(src, 0, idx, out=out)
    else:
        out.copy_(src.index_select(0, idx))

