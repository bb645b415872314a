"""Data movement maps classes exactly: the op itself is applied to the class-id tensor (an integer
tensor goes through view, permute, cat, getitem... the same way the data does), then compacted.
Zero padding marks the padded elements ZERO; ops that mix positions within a channel (interpolation,
non-constant padding) merge the classes along the dims they mix."""
from __future__ import annotations

import operator

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..context import _map_tensors, has_tensor
from ..value import PIN, ZERO, ParamView, Value, compact
from . import _register

__all__ = ["movement"]


def _apply(ctx, substitute):
    """Re-run the node's op with its data argument(s) replaced by `substitute(Value)`."""
    node = ctx.node
    sub = _substitute(ctx.args[0], substitute)
    rest, kwargs = ctx.real_args[1:], ctx.real_kwargs
    if node.op == "call_method":
        # ids are often stride-0 views, which .view cannot always take: reshape moves the same way
        method = "reshape" if node.target == "view" else node.target
        return getattr(sub, method)(*rest, **kwargs)
    if node.op == "call_module":
        return ctx.module(sub, *rest, **kwargs)
    return node.target(sub, *rest, **kwargs)


def _substitute(arg, fn):
    if isinstance(arg, Value):
        return fn(arg)
    if isinstance(arg, (list, tuple)):
        return type(arg)(_substitute(a, fn) for a in arg)
    return arg


def movement(ctx, x, *args, **kwargs):
    """Pure data movement: output element i is input element j, for a map that depends on shapes only."""
    if isinstance(x, Value) and x.param is not None and x.ids is None:
        # A view of a parameter stays a parameter view (F.linear(x, self.w.t()) is still a Linear).
        def entries(v):
            return v.param.entries if v.param.entries is not None else torch.arange(
                v.shape.numel()).view(v.shape)
        return _map_tensors(_apply(ctx, entries), lambda e: Value(e.shape, None, ParamView(x.param.name, e)))
    return _map_tensors(_apply(ctx, ctx.full), lambda ids: Value(ids.shape, compact(ids)))


def getitem(ctx, x, idx):
    if not isinstance(x, Value):              # indexing the tuple a rule returned
        return x[idx]
    if has_tensor(ctx.real_args[1]):
        # A tensor index may depend on the data: every element may land anywhere, so one class.
        rep = ctx.reduce(x, range(len(x.shape)))
        return ctx.value(rep.reshape(-1)[:1])
    return movement(ctx, x, idx)


def pad(ctx, x, pad, mode="constant", value=None):
    if mode == "constant":
        fill = ZERO if not value else PIN
        ids = F.pad(ctx.full(x), pad, mode="constant", value=fill)
        if fill == PIN and bool((ctx.ids(x) > PIN).any()):
            ctx.pin(x, reason="padding with a non-zero constant")
        return Value(ids.shape, compact(ids))
    dims = range(len(x.shape) - len(pad) // 2, len(x.shape))   # reflect/replicate/circular copy
    return ctx.value(ctx.reduce(x, dims))


def pad_module(ctx, x):
    m = ctx.module
    value = getattr(m, "value", 0.0)
    mode = "constant" if isinstance(m, (nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d,
                                        nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d)) else "reflect"
    return pad(ctx, x, list(m.padding), mode=mode, value=value)


def spatial_mix(ctx, x, *args, **kwargs):
    """Interpolation mixes positions within each channel: merge along every dim after the channel."""
    return ctx.value(ctx.reduce(x, range(2, len(x.shape))))


_register([torch.flatten, torch.reshape, torch.permute, torch.transpose, torch.swapaxes,
           torch.squeeze, torch.unsqueeze, torch.cat, torch.concat, torch.concatenate, torch.stack,
           torch.split, torch.chunk, torch.unbind, torch.narrow, torch.select, torch.flip,
           torch.roll, torch.movedim, torch.tile, torch.t, torch.hstack, torch.vstack,
           torch.unflatten, torch.tensor_split, F.pixel_shuffle, F.pixel_unshuffle,
           torch.channel_shuffle, F.channel_shuffle,
           "view", "reshape", "flatten", "unflatten", "permute", "transpose", "t", "squeeze",
           "unsqueeze", "expand", "repeat", "split", "chunk", "unbind", "narrow", "select", "flip",
           "roll", "movedim", "swapaxes", "tile", "mT", "tensor_split",
           nn.Flatten, nn.Unflatten, nn.PixelShuffle, nn.PixelUnshuffle, nn.ChannelShuffle], movement)
_register([operator.getitem], getitem)
_register([F.pad, torch.constant_pad_nd], pad)
_register([nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d, nn.ConstantPad1d, nn.ConstantPad2d,
           nn.ConstantPad3d, nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReflectionPad3d,
           nn.ReplicationPad1d, nn.ReplicationPad2d, nn.ReplicationPad3d, nn.CircularPad1d,
           nn.CircularPad2d, nn.CircularPad3d], pad_module)
_register([F.interpolate, F.upsample, F.upsample_nearest, F.upsample_bilinear, nn.Upsample,
           nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d], spatial_mix)


def _same_as(ctx, x, other):
    """expand_as / view_as / reshape_as: the other tensor only gives a shape."""
    method = ctx.node.target[: -len("_as")]
    moved = getattr(ctx.full(x), method)(ctx.real_args[1].shape)
    return Value(moved.shape, compact(moved))


_register(["expand_as", "view_as", "reshape_as"], _same_as)
