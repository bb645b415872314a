"""Pooling and reductions. Max, average and Lp pooling are positively homogeneous when every element
of a window has the same scale, so the classes of a window merge (within a channel that is free; for
Arch1's max-pooling across features it ties neighbouring units). Sums, means, maxima and norms over
dims merge along those dims (over the channel dim: the channels merge)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..value import Value
from . import _register

__all__ = ["pool", "reduce_dims"]


def _tuple(v, k):
    return tuple(v) if isinstance(v, (list, tuple)) else (v,) * k


def _windows(n_in, n_out, kernel, stride, padding, dilation):
    """Input positions read by each output position along one dim (padding excluded)."""
    out = []
    for o in range(n_out):
        start = o * stride - padding
        out.append([p for p in range(start, start + (kernel - 1) * dilation + 1, dilation)
                    if 0 <= p < n_in])
    return out


def _adaptive_windows(n_in, n_out):
    return [list(range((o * n_in) // n_out, -((-(o + 1) * n_in) // n_out))) for o in range(n_out)]


def _union_windows(ctx, ids, dim, windows):
    """Merge the classes inside each window along `dim`; returns ids with len(windows) along dim."""
    if ids.size(dim) == 1:
        return ids                                            # already one class along dim
    reps = torch.tensor([w[0] for w in windows])
    rep = ids.index_select(dim, reps)                        # (..., n_out, ...)
    src = torch.tensor([p for w in windows for p in w])
    dst = torch.tensor([o for o, w in enumerate(windows) for _ in w])
    ctx.classes.union(ids.index_select(dim, src), rep.index_select(dim, dst))
    return rep


def pool(ctx, x, k, windows_of):
    """Window union over the last k dims; windows_of(d, n_in, n_out) gives one dim's windows."""
    out = ctx.real[0] if isinstance(ctx.real, tuple) else ctx.real
    ids = ctx.ids(x)
    nd = len(x.shape)
    for i, d in enumerate(range(nd - k, nd)):
        ids = _union_windows(ctx, ids, d, windows_of(i, x.shape[d], out.shape[d]))
    value = ctx.value(ids, out.shape)
    if isinstance(ctx.real, tuple):                          # (values, indices)
        return value, ctx.constant(ctx.real[1].shape)
    return value


def _pool_rule(k, kind):
    def rule(ctx, x, *args, **kwargs):
        m = ctx.module
        if kind == "adaptive":
            return pool(ctx, x, k, lambda i, n_in, n_out: _adaptive_windows(n_in, n_out))
        if m is not None:
            kernel, stride = m.kernel_size, m.stride
            padding, dilation = m.padding, getattr(m, "dilation", 1)
        else:
            names = {"max": ["kernel_size", "stride", "padding", "dilation"],
                     "avg": ["kernel_size", "stride", "padding"],
                     "lp": ["norm_type", "kernel_size", "stride"]}[kind]
            got = dict(zip(names, args))
            got.update({n: kwargs[n] for n in names if n in kwargs})
            kernel, stride = got["kernel_size"], got.get("stride")
            padding, dilation = got.get("padding", 0), got.get("dilation", 1)
        if kind == "lp":
            padding, dilation = 0, 1
        kernel = _tuple(kernel, k)
        stride = kernel if stride is None or stride == [] or stride == () else _tuple(stride, k)
        padding, dilation = _tuple(padding, k), _tuple(dilation, k)
        return pool(ctx, x, k, lambda i, n_in, n_out: _windows(
            n_in, n_out, kernel[i], stride[i], padding[i], dilation[i]))
    return rule


def _dims_arg(dim, nd):
    if dim is None or dim == () or dim == []:
        return list(range(nd))
    return [d % nd for d in ((dim,) if isinstance(dim, int) else dim)] if nd else []


def reduce_dims(ctx, x, dims, keepdim):
    """Merge along dims, then drop them unless keepdim."""
    ids = ctx.reduce(x, dims)
    if not keepdim:
        keep = [d for d in range(ids.dim()) if d not in dims]
        ids = ids.reshape([ids.size(d) for d in keep])
    return ctx.value(ids)


def sum_like(ctx, x, dim=None, keepdim=False, *args, **kwargs):
    """sum, mean, nansum, nanmean, amax, amin: homogeneous of degree 1."""
    return reduce_dims(ctx, x, _dims_arg(dim, len(x.shape)), keepdim)


def norm_rule(ctx, x, p="fro", dim=None, keepdim=False, *args, **kwargs):
    return reduce_dims(ctx, x, _dims_arg(dim, len(x.shape)), keepdim)


def std_rule(ctx, x, dim=None, *args, keepdim=False, **kwargs):
    if isinstance(dim, bool):                                 # std(x, unbiased)
        dim = None
    if len(args) > 1:                                         # std(x, dim, unbiased, keepdim)
        keepdim = args[1]
    return reduce_dims(ctx, x, _dims_arg(dim, len(x.shape)), keepdim)


def max_like(ctx, x, dim=None, keepdim=False, **kwargs):
    """torch.max / torch.min: all elements, along a dim (values, indices), or against a tensor."""
    dim = kwargs.get("other", dim)
    if isinstance(dim, Value):
        return ctx.value(ctx.union(x, dim))
    if dim is None:
        return reduce_dims(ctx, x, list(range(len(x.shape))), False)
    values = reduce_dims(ctx, x, _dims_arg(dim, len(x.shape)), keepdim)
    return values, ctx.constant(ctx.real[1].shape)


def argmax_like(ctx, x, *args, **kwargs):
    """Indices do not scale; they do not depend on the scale when a slice shares one class."""
    dim = args[0] if args else kwargs.get("dim")
    ctx.reduce(x, _dims_arg(dim, len(x.shape)))
    return ctx.constant()


_register([nn.MaxPool1d, F.max_pool1d, torch.max_pool1d, F.max_pool1d_with_indices],
          _pool_rule(1, "max"))
_register([nn.MaxPool2d, F.max_pool2d, torch.max_pool2d, F.max_pool2d_with_indices],
          _pool_rule(2, "max"))
_register([nn.MaxPool3d, F.max_pool3d, torch.max_pool3d, F.max_pool3d_with_indices],
          _pool_rule(3, "max"))
_register([nn.AvgPool1d, F.avg_pool1d, torch.avg_pool1d], _pool_rule(1, "avg"))
_register([nn.AvgPool2d, F.avg_pool2d], _pool_rule(2, "avg"))
_register([nn.AvgPool3d, F.avg_pool3d], _pool_rule(3, "avg"))
_register([nn.LPPool1d, F.lp_pool1d], _pool_rule(1, "lp"))
_register([nn.LPPool2d, F.lp_pool2d], _pool_rule(2, "lp"))
for _k, _fns in ((1, [nn.AdaptiveAvgPool1d, nn.AdaptiveMaxPool1d, F.adaptive_avg_pool1d,
                      F.adaptive_max_pool1d, torch.adaptive_avg_pool1d]),
                 (2, [nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, F.adaptive_avg_pool2d,
                      F.adaptive_max_pool2d]),
                 (3, [nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool3d, F.adaptive_avg_pool3d,
                      F.adaptive_max_pool3d])):
    _register(_fns, _pool_rule(_k, "adaptive"))
_register([torch.sum, torch.mean, torch.nansum, torch.nanmean, torch.amax, torch.amin,
           "sum", "mean", "nansum", "nanmean", "amax", "amin"], sum_like)
_register([torch.norm, "norm"], norm_rule)
_register([torch.std, "std"], std_rule)
_register([torch.max, torch.min, "max", "min"], max_like)
_register([torch.argmax, torch.argmin, "argmax", "argmin"], argmax_like)
