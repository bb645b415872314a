"""Pooling and reductions. Max, average and Lp pooling are positively homogeneous when every element
of a window has the same scale, so the classes of a window merge (within a channel that is free; for
Arch1's max-pooling across features it ties neighbouring units). Sums, means, maxima and norms over
dims merge along those dims (over the channel dim: the channels merge); a variance has twice the
exponent of what it reduces."""
from __future__ import annotations

import torch

from ..value import Value
from . import _register, aten

__all__ = ["pool", "reduce_dims"]



def _tuple(v, k):
    return tuple(v) if isinstance(v, (list, tuple)) and len(v) == k else (
        (tuple(v) * k)[:k] if isinstance(v, (list, tuple)) and v else (v,) * k)


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


def _window_pool(k):
    def rule(ctx, x, kernel_size, stride=(), padding=0, dilation=1, *args):
        if not isinstance(dilation, (int, list, tuple)):      # avg_pool: ceil_mode in this slot
            dilation = 1
        kernel = _tuple(kernel_size, k)
        stride = kernel if stride is None or stride == [] or stride == () else _tuple(stride, k)
        padding, dilation = _tuple(padding, k), _tuple(dilation, k)
        return pool(ctx, x, k, lambda i, n_in, n_out: _windows(
            n_in, n_out, kernel[i], stride[i], padding[i], dilation[i]))
    return rule


def _avg_pool(k):
    inner = _window_pool(k)

    def rule(ctx, x, kernel_size, stride=(), padding=0, *args):
        return inner(ctx, x, kernel_size, stride, padding, 1)
    return rule


def _adaptive(k):
    def rule(ctx, x, output_size):
        return pool(ctx, x, k, lambda i, n_in, n_out: _adaptive_windows(n_in, n_out))
    return rule


def _dims_arg(dim, nd):
    if dim is None or dim == () or dim == []:
        return list(range(nd))
    return [d % nd for d in ((dim,) if isinstance(dim, int) else dim)] if nd else []


def reduce_dims(ctx, x, dims, keepdim, power=1):
    """Merge along dims, then drop them unless keepdim; `power`: the result's exponent multiple."""
    ids = ctx.reduce(x, dims)
    if not keepdim:
        keep = [d for d in range(ids.dim()) if d not in dims]
        ids = ids.reshape([ids.size(d) for d in keep])
    if power != 1:
        ids = ctx.combine([(power, ids)])
    return ctx.value(ids)


def sum_like(ctx, x, dim=None, keepdim=False, *args, **kwargs):
    """sum, mean, amax, amin, logsumexp-free reductions: homogeneous of degree 1."""
    if isinstance(dim, torch.dtype):
        dim = None
    return reduce_dims(ctx, x, _dims_arg(dim, len(x.shape)), bool(keepdim))


def vector_norm(ctx, x, ord=2, dim=None, keepdim=False, *args, **kwargs):
    return reduce_dims(ctx, x, _dims_arg(dim, len(x.shape)), keepdim)


def var_like(ctx, x, dim=None, *args, correction=None, keepdim=False, **kwargs):
    """var (exponent 2λ) and std (λ): var.correction(x, dim, correction=, keepdim=)."""
    if isinstance(dim, bool):
        dim = None
    rest = [a for a in args if isinstance(a, bool)]
    keepdim = kwargs.get("keepdim", rest[-1] if rest else keepdim)
    power = 2 if ctx.node.target.overloadpacket is aten.var else 1
    return reduce_dims(ctx, x, _dims_arg(dim, len(x.shape)), keepdim, power)


def var_mean(ctx, x, dim=None, *args, keepdim=False, **kwargs):
    dims = _dims_arg(dim, len(x.shape))
    mean = reduce_dims(ctx, x, dims, keepdim)
    return Value(torch.Size(ctx.real[0].shape), ctx.combine([(2, mean.ids)])), \
        Value(torch.Size(ctx.real[1].shape), mean.ids)


def max_dim(ctx, x, dim, keepdim=False):
    """max.dim / min.dim: (values, indices); the indices do not scale."""
    values = reduce_dims(ctx, x, _dims_arg(dim, len(x.shape)), keepdim)
    return values, ctx.constant(ctx.real[1].shape)


def max_all(ctx, x, other=None):
    if isinstance(other, Value):
        return ctx.value(ctx.union(x, other))
    return reduce_dims(ctx, x, list(range(len(x.shape))), False)


def argmax_like(ctx, x, dim=None, keepdim=False):
    """Indices do not scale; they do not depend on the scale when a slice shares one class."""
    ctx.reduce(x, _dims_arg(dim, len(x.shape)))
    return ctx.constant()


for _k, _ops in ((1, [aten.max_pool1d, aten.max_pool1d_with_indices]),
                 (2, [aten.max_pool2d, aten.max_pool2d_with_indices]),
                 (3, [aten.max_pool3d, aten.max_pool3d_with_indices])):
    _register(_ops, _window_pool(_k))
_register([aten.avg_pool1d], _avg_pool(1))
_register([aten.avg_pool2d], _avg_pool(2))
_register([aten.avg_pool3d], _avg_pool(3))
for _k, _ops in ((1, [aten.adaptive_avg_pool1d, aten.adaptive_max_pool1d]),
                 (2, [aten.adaptive_avg_pool2d, aten._adaptive_avg_pool2d, aten.adaptive_max_pool2d]),
                 (3, [aten.adaptive_avg_pool3d, aten._adaptive_avg_pool3d, aten.adaptive_max_pool3d])):
    _register(_ops, _adaptive(_k))
_register([aten.sum, aten.mean, aten.nansum, aten.nanmean, aten.amax, aten.amin], sum_like)
_register([aten.linalg_vector_norm, aten.norm, aten.frobenius_norm], vector_norm)
_register([aten.var, aten.std], var_like)
_register([aten.var_mean], var_mean)
_register([aten.max.dim, aten.min.dim], max_dim)
_register([aten.max.default, aten.min.default, aten.max.other, aten.min.other], max_all)
_register([aten.argmax, aten.argmin], argmax_like)
