"""scaled_dot_product_attention (DESIGN §3.2): softmax(q kᵀ · scale + mask) v.

The logits contract q and k over the head dimension: λ_q(h, e) + λ_k(h', e) must be one value per
query head h (h' its key head under grouped-query attention), and softmax pins it, so each head
dimension's query scale is the inverse of its key scale (a relation per (h, e)). The output has the
value's classes, per head and value channel, constant over the key positions it averages."""
from __future__ import annotations

import torch

from ..value import Value, compact
from . import _register, aten
from .layers import contract

__all__ = ["sdpa"]



def sdpa(ctx, q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    if isinstance(attn_mask, Value) and not attn_mask.is_constant:
        ctx.pin(attn_mask, reason="attention mask that scales")
    hq, hk = q.shape[-3] if len(q.shape) >= 3 else 1, k.shape[-3] if len(k.shape) >= 3 else 1
    k_ids = compact(_heads(ctx.full(k), hq, hk))
    v_ids = compact(_heads(ctx.full(v), hq, hk))
    kq = Value(torch.Size(_heads(ctx.full(k), hq, hk).shape), k_ids)
    logits = contract(ctx, q, _transpose(kq), "...ik,...kj->...ij")   # (..., Hq, L, S)
    ctx.pin(logits, reason="softmax of the attention logits")
    # out[..., l, e] = Σ_s p[..., l, s] v[..., s, e]: the weights are pinned (scale 1)
    red = ctx.reduce(Value(torch.Size(v_ids.shape), v_ids), [v_ids.dim() - 2])
    if isinstance(ctx.real, tuple):      # the fused kernels' (out, logsumexp, ...) forms
        return (ctx.value(red, ctx.real[0].shape), *[ctx.constant(t.shape) for t in ctx.real[1:]
                                                      if isinstance(t, torch.Tensor)])
    return ctx.value(red, ctx.real.shape)


def _heads(ids: torch.Tensor, hq: int, hk: int) -> torch.Tensor:
    """Key/value ids laid out per query head (grouped-query attention repeats each key head)."""
    if hq == hk or ids.dim() < 3:
        return ids
    return ids.repeat_interleave(hq // hk, dim=-3)


def _transpose(v: Value) -> Value:
    ids = v.ids.transpose(-2, -1)
    shape = list(v.shape)
    shape[-2], shape[-1] = shape[-1], shape[-2]
    return Value(torch.Size(shape), ids)


_register([aten.scaled_dot_product_attention, aten._scaled_dot_product_flash_attention_for_cpu,
           aten._scaled_dot_product_efficient_attention, aten._scaled_dot_product_flash_attention,
           aten._scaled_dot_product_cudnn_attention], sdpa)
