"""Layers with weights: each output channel starts a fresh class (+1 on its weight row and bias),
each input channel's class is divided out of the weight slice that reads it (-1 on the column, for
every spatial tap). Module and functional forms share one rule per family."""
from __future__ import annotations

import operator

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..value import Value
from . import _register
from .elementwise import pin

__all__ = ["linear", "conv", "conv_transpose", "embedding"]


def _channel_out(ctx, rows: torch.Tensor, dim: int) -> Value:
    nd = len(ctx.real.shape)
    shape = [1] * nd
    shape[dim % nd] = rows.numel()
    return ctx.value(rows.view(shape))


def _weight_and_bias(ctx, weight, bias):
    if ctx.module is not None:
        return ctx.param_value(ctx.module.weight), ctx.param_value(getattr(ctx.module, "bias", None))
    return weight, bias


def _consume_with_constant_weight(ctx, x, weight, bias, dim):
    """A weight that is not a parameter: a constant one mixes the channels it reads (they merge);
    a scaled one makes a product of two scaled tensors (pin)."""
    if isinstance(weight, Value) and weight.is_constant:
        rep = ctx.reduce(x, [dim])
        if bias is not None and not ctx.bind_bias(bias, rep.reshape(-1)[:1]):
            ctx.pin(x, reason="bias is not a parameter")
        return ctx.value(rep)
    return pin(ctx, x, weight, bias)


def linear(ctx, x, weight=None, bias=None):
    weight, bias = _weight_and_bias(ctx, weight, bias)
    if weight.param is None:
        return _consume_with_constant_weight(ctx, x, weight, bias, -1)
    out_f = weight.shape[0]
    cols = ctx.channel_classes(x, -1)                        # (in,)
    rows = ctx.fresh(out_f)                                  # (out,)
    if not ctx.bind(weight, [(+1, rows.view(-1, 1)), (-1, cols.view(1, -1))]):
        return pin(ctx, x, weight, bias)
    ctx.bind_bias(bias, rows)
    _note_bias(ctx, bias, len(ctx.real.shape) - 1)
    return _channel_out(ctx, rows, -1)


def _note_bias(ctx, bias, dim):
    if bias is not None and bias.param is not None and bias.param.entries is None:
        ctx.bias_of[ctx.node] = (bias.param.name, dim)


def conv(ctx, x, weight=None, bias=None, stride=1, padding=0, dilation=1, groups=1):
    if ctx.module is not None:
        groups = ctx.module.groups
    weight, bias = _weight_and_bias(ctx, weight, bias)
    cdim = len(x.shape) - (len(weight.shape) - 2) - 1        # 1 batched, 0 unbatched
    if weight.param is None:
        return _consume_with_constant_weight(ctx, x, weight, bias, cdim)
    c_out, c_in_g = weight.shape[:2]
    taps = (1,) * (len(weight.shape) - 2)
    ins = ctx.channel_classes(x, cdim)                       # (C_in,)
    group = torch.arange(c_out) // (c_out // groups)         # group of each output channel
    cols = ins[group.view(-1, 1) * c_in_g + torch.arange(c_in_g).view(1, -1)]   # (C_out, C_in/g)
    rows = ctx.fresh(c_out)
    if not ctx.bind(weight, [(+1, rows.view(-1, 1, *taps)), (-1, cols.view(c_out, c_in_g, *taps))]):
        return pin(ctx, x, weight, bias)
    ctx.bind_bias(bias, rows)
    _note_bias(ctx, bias, cdim)
    return _channel_out(ctx, rows, cdim)


def conv_transpose(ctx, x, weight=None, bias=None, stride=1, padding=0, output_padding=0,
                   groups=1, dilation=1, *args, **kwargs):
    if ctx.module is not None:
        groups = ctx.module.groups
    weight, bias = _weight_and_bias(ctx, weight, bias)
    cdim = len(x.shape) - (len(weight.shape) - 2) - 1
    if weight.param is None:
        return _consume_with_constant_weight(ctx, x, weight, bias, cdim)
    c_in, c_out_g = weight.shape[:2]
    c_out = c_out_g * groups
    taps = (1,) * (len(weight.shape) - 2)
    ins = ctx.channel_classes(x, cdim)                       # (C_in,)
    rows = ctx.fresh(c_out)
    group = torch.arange(c_in) // (c_in // groups)
    outs = rows[group.view(-1, 1) * c_out_g + torch.arange(c_out_g).view(1, -1)]   # (C_in, C_out/g)
    if not ctx.bind(weight, [(-1, ins.view(-1, 1, *taps)), (+1, outs.view(c_in, c_out_g, *taps))]):
        return pin(ctx, x, weight, bias)
    ctx.bind_bias(bias, rows)
    _note_bias(ctx, bias, cdim)
    return _channel_out(ctx, rows, cdim)


def embedding(ctx, idx, weight=None, *args, **kwargs):
    weight = ctx.param_value(ctx.module.weight) if ctx.module is not None else weight
    if weight.param is None:
        return pin(ctx, idx, weight)
    rows = ctx.fresh(weight.shape[1])                        # one class per embedding coordinate
    if not ctx.bind(weight, [(+1, rows.view(1, -1))]):
        return pin(ctx, weight)
    return _channel_out(ctx, rows, -1)


def matmul(ctx, a, b):
    """x @ W with W a (view of a) 2-D parameter is a Linear without bias; W @ x likewise along -2."""
    if isinstance(b, Value) and b.param is not None and b.ids is None and len(b.shape) == 2:
        cols = ctx.channel_classes(a, -1)                    # x (..., in) @ W (in, out)
        rows = ctx.fresh(b.shape[1])
        if ctx.bind(b, [(-1, cols.view(-1, 1)), (+1, rows.view(1, -1))]):
            return _channel_out(ctx, rows, -1)
    elif isinstance(a, Value) and a.param is not None and a.ids is None and len(a.shape) == 2 \
            and len(b.shape) >= 2:
        cols = ctx.channel_classes(b, -2)                    # W (out, in) @ x (..., in, n)
        rows = ctx.fresh(a.shape[0])
        if ctx.bind(a, [(+1, rows.view(-1, 1)), (-1, cols.view(1, -1))]):
            return _channel_out(ctx, rows, -2)
    for w, x, dim in ((b, a, -1), (a, b, -2)):               # a constant matrix mixes channels
        if isinstance(w, Value) and w.is_constant and isinstance(x, Value):
            return ctx.value(ctx.reduce(x, [dim]))
    ctx.pin(a, b, reason="matmul of two scaled tensors (a product: scales add, no class holds it)")
    return ctx.constant()


_register([nn.Linear, F.linear, torch._C._nn.linear], linear)
_register([nn.Conv1d, nn.Conv2d, nn.Conv3d, F.conv1d, F.conv2d, F.conv3d], conv)
_register([nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, F.conv_transpose1d,
           F.conv_transpose2d, F.conv_transpose3d], conv_transpose)
_register([nn.Embedding, F.embedding], embedding)
_register([torch.matmul, operator.matmul, torch.mm, torch.bmm,
           "matmul", "mm", "bmm"], matmul)
