"""Data movement maps classes exactly: the op itself is applied to the class-id tensor (an integer
tensor goes through view, permute, cat, slice... the same way the data does), then compacted.
Zero padding marks the padded elements ZERO; ops that mix positions within a channel
(interpolation, reflection padding) merge the classes along the dims they mix; indexing with a
tensor (gather, index_select, advanced indexing) may move any element along the indexed dims to any
position, so the classes along those dims merge first."""
from __future__ import annotations

import operator

import torch

from ..context import _map_tensors
from ..value import PIN, ZERO, ParamView, Value, compact
from . import _register, aten

__all__ = ["movement"]

_AS_RESHAPE = {aten.view.default, aten._unsafe_view.default, aten.view.dtype}


def _substitute(arg, fn):
    if isinstance(arg, Value):
        return fn(arg)
    if isinstance(arg, (list, tuple)):
        return type(arg)(_substitute(a, fn) for a in arg)
    return arg


def _run(ctx, substitute):
    """Re-run the node's op with every Value argument replaced by `substitute(Value)` and every
    other argument as it really was."""
    target = ctx.node.target
    if target in _AS_RESHAPE:
        target = aten.reshape.default       # ids are often stride-0 views, which view cannot take
    args = [_substitute(a, substitute) if _has_value(a) else r for a, r in zip(ctx.args, ctx.real_args)]
    kwargs = {k: (_substitute(v, substitute) if _has_value(v) else ctx.real_kwargs[k])
              for k, v in ctx.kwargs.items()}
    return target(*args, **kwargs)


def _has_value(a):
    return isinstance(a, Value) or (isinstance(a, (list, tuple)) and any(isinstance(x, Value) for x in a))


def movement(ctx, *args, **kwargs):
    """Pure data movement: output element i is input element j, for a map that depends on shapes only."""
    values = [v for a in args for v in (a if isinstance(a, (list, tuple)) else [a]) if isinstance(v, Value)]
    if len(values) == 1 and values[0].param is not None and values[0].ids is None:
        x = values[0]
        # A view of a parameter stays a parameter view (linear(x, self.w.t()) is still a Linear).
        def entries(v):
            return v.param.entries if v.param.entries is not None else torch.arange(
                v.shape.numel()).view(v.shape)
        return _map_tensors(_run(ctx, entries), lambda e: Value(e.shape, None, ParamView(x.param.name, e)))
    return _map_tensors(_run(ctx, ctx.full), lambda ids: Value(ids.shape, compact(ids)))


def getitem(ctx, x, idx):
    """Indexing the tuple or list a rule returned."""
    return x[idx]


def indexed(dims_of):
    """gather / index_select / index: merge along the indexed dims, then move as the op does."""
    def rule(ctx, x, *args, **kwargs):
        dims = dims_of(ctx, x, *args)
        merged = ctx.reduce(x, dims).expand(x.shape) if dims else ctx.full(x)
        sub = {id(x): merged}
        args_real = [ctx.real_args[0]] + list(ctx.real_args[1:])
        out = ctx.node.target(sub[id(x)], *args_real[1:], **ctx.real_kwargs)
        return Value(out.shape, compact(out))
    return rule


def _dim_arg(ctx, x, dim, *rest):
    return [dim % len(x.shape)] if len(x.shape) else []


def _index_dims(ctx, x, indices, *rest):
    return [d for d, i in enumerate(indices) if i is not None]


def pad_rule(ctx, x, pad, value=0.0):
    fill = ZERO if not value else PIN
    ids = aten.constant_pad_nd(ctx.full(x), pad, fill)
    if fill == PIN and bool((ctx.ids(x) > PIN).any()):
        ctx.pin(x, reason="padding with a non-zero constant")
    return Value(ids.shape, compact(ids))


def pad_any(ctx, x, pad, mode="constant", value=None):
    """aten.pad: constant padding, or the modes that copy neighbours."""
    if mode == "constant":
        return pad_rule(ctx, x, pad, value or 0.0)
    return mixing_pad(ctx, x, pad)


def mixing_pad(ctx, x, pad, *args):
    dims = range(len(x.shape) - len(pad) // 2, len(x.shape))   # reflect / replicate / circular copy
    return ctx.value(ctx.reduce(x, dims))


def spatial_mix(ctx, x, *args, **kwargs):
    """Interpolation mixes positions within each channel: merge along every dim after the channel."""
    return ctx.value(ctx.reduce(x, range(2, len(x.shape))))


def copy(ctx, dst, src, *args):
    """copy(dst, src): the result is src's values in dst's shape."""
    if not isinstance(src, Value):
        return ctx.constant()
    return Value(torch.Size(ctx.real.shape), compact(ctx.full(src).expand(ctx.real.shape)))


def scatter_like(ctx, base, src, *args):
    """slice_scatter / select_scatter / diagonal_scatter: exact on the ids."""
    return _map_tensors(_run(ctx, ctx.full), lambda ids: Value(ids.shape, compact(ids)))


_register([aten.view, aten._unsafe_view, aten.reshape, aten.flatten, aten.unflatten, aten.permute,
           aten.transpose, aten.transpose_, aten.t, aten.numpy_T, aten.squeeze, aten.squeeze_,
           aten.unsqueeze, aten.unsqueeze_, aten.expand, aten.expand_as, aten.repeat, aten.cat,
           aten.concat, aten.stack, aten.split, aten.split_with_sizes, aten.chunk, aten.unbind,
           aten.narrow, aten.select, aten.slice, aten.flip, aten.roll, aten.movedim, aten.swapaxes,
           aten.tile, aten.pixel_shuffle, aten.pixel_unshuffle, aten.channel_shuffle,
           aten.native_channel_shuffle, aten.tensor_split, aten.hstack, aten.vstack, aten.view_as,
           aten.reshape_as, aten.diagonal, aten.unfold, aten.mT, aten.mH, aten.adjoint,
           aten.repeat_interleave.self_int], movement)
# not movement on ids: as_strided reads the real tensor's storage layout, which a compact id tensor
# does not have; im2col pads with zeros and col2im sums overlaps. Without a rule they pin.
_register([operator.getitem], getitem)
_register([aten.index_select, aten.gather], indexed(_dim_arg))
_register([aten.index.Tensor], indexed(_index_dims))
_register([aten.constant_pad_nd], pad_rule)
_register([aten.pad], pad_any)
_register([aten.reflection_pad1d, aten.reflection_pad2d, aten.reflection_pad3d,
           aten.replication_pad1d, aten.replication_pad2d, aten.replication_pad3d,
           aten._pad_circular], mixing_pad)
_register([aten.upsample_nearest1d, aten.upsample_nearest2d, aten.upsample_nearest3d,
           aten.upsample_bilinear2d, aten.upsample_linear1d, aten.upsample_bicubic2d,
           aten.upsample_trilinear3d, aten._upsample_nearest_exact1d, aten._upsample_nearest_exact2d,
           aten._upsample_nearest_exact3d, aten._upsample_bilinear2d_aa,
           aten._upsample_bicubic2d_aa], spatial_mix)
_register([aten.copy, aten.copy_], copy)
_register([aten.slice_scatter, aten.select_scatter, aten.diagonal_scatter], scatter_like)
