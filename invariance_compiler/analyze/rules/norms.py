"""Normalisers end a class: the scale of what they normalise is absorbed (a normalize generator),
and their affine weight and bias start a fresh class per channel. BatchNorm/InstanceNorm absorb one
scale per channel and make the bias of a Linear/Conv/normaliser feeding only them inert (the mean removes it);
LayerNorm and RMSNorm absorb one joint scale per normalised vector; GroupNorm one per group.
Eval-mode BatchNorm with running statistics is an affine map: it pins its input."""
from __future__ import annotations

import math
import operator

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

from . import _register
from .layers import _note_bias
from .pooling import _tuple

__all__ = ["batch_norm", "group_norm", "layer_norm", "mark_inert_biases"]


def _affine(ctx, weight, bias, shape):
    """Output classes of `xhat * weight + bias`; xhat has scale 1, so the affine pair is the producer."""
    if weight is None and bias is None:
        return torch.zeros(shape, dtype=torch.long)
    cls = ctx.fresh(math.prod(shape)).view(shape)
    ctx.bind(weight, [(+1, cls)])
    ctx.bind_bias(bias, cls)
    return cls


def _module_affine(ctx, weight, bias):
    if ctx.module is not None:
        return ctx.param_value(getattr(ctx.module, "weight", None)), \
            ctx.param_value(getattr(ctx.module, "bias", None))
    return weight, bias


def _per_channel_out(ctx, cls):
    shape = [1] * len(ctx.real.shape)
    shape[1] = cls.numel()
    return ctx.value(cls.view(shape))


def mark_inert_biases(ctx) -> None:
    """A per-channel constant is removed by the mean of a BatchNorm/InstanceNorm (or a GroupNorm
    with one channel per group). The bias of a Linear/Conv/normaliser is inert when every route from
    it reaches such a normaliser through ops that keep a per-channel constant per-channel."""
    for node, (name, dim) in ctx.bias_of.items():
        if dim == 1 and _only_centred(ctx, node):
            ctx.bindings[name].inert = True


def _only_centred(ctx, node) -> bool:
    for user in node.users:
        if user in ctx.centred and user.args[0] is node:
            continue
        if not (_keeps_channel_constants(ctx, user, node) and _only_centred(ctx, user)):
            return False
    return bool(node.users)


_ADD = (operator.add, operator.sub, torch.add, torch.sub, "add", "sub")
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _keeps_channel_constants(ctx, node, src) -> bool:
    """Whether a constant per channel (dim 1) added to `src` reaches the output of `node` as a
    constant per channel: data movement along channels, max-pooling, unpadded average pooling,
    sums, and affine layers that treat every position alike (a Linear on (N, C), a convolution
    without padding)."""
    t = node.target
    if node.op == "call_module":
        m = ctx.gm.get_submodule(t)
        if isinstance(m, nn.Linear):
            return node.args[0] is src and _ndim(node) == 2
        if isinstance(m, _CONVS):
            return node.args[0] is src and _unpadded(m.padding)
        if isinstance(m, (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool1d,
                          nn.AdaptiveMaxPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d)):
            return True
        return isinstance(m, (nn.AvgPool1d, nn.AvgPool2d)) and not any(_tuple(m.padding, 1))
    if t in _ADD:                    # a sum keeps it, unless broadcasting moves dim 1 elsewhere
        return _ndim(node) == _ndim(src)
    if t is F.linear:
        return node.args[0] is src and _ndim(node) == 2
    if t in (F.conv1d, F.conv2d, F.conv3d):
        return node.args[0] is src and _unpadded(node.kwargs.get("padding", node.args[4] if len(node.args) > 4 else 0))
    dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
    if t in (torch.cat, torch.concat):
        return dim == 1
    if t in (torch.split, torch.chunk) or t in ("split", "chunk"):
        dim = node.kwargs.get("dim", node.args[2] if len(node.args) > 2 else 0)
        return dim == 1
    if t is operator.getitem:
        return isinstance(node.args[0], torch.fx.Node) and node.args[0].target in (
            torch.split, torch.chunk, "split", "chunk")
    return t in (F.max_pool1d, F.max_pool2d, F.max_pool3d, F.adaptive_max_pool2d,
                 F.adaptive_avg_pool2d, F.adaptive_avg_pool1d)


def _ndim(node) -> int:
    value = node.meta.get("ic_value")
    return len(value.shape) if hasattr(value, "shape") else -1


def _unpadded(padding) -> bool:
    return padding == "valid" or (not isinstance(padding, str) and not any(_tuple(padding, 1)))


def batch_norm(ctx, x, running_mean=None, running_var=None, weight=None, bias=None, training=False,
               *args, **kwargs):
    """Covers F.batch_norm and F.instance_norm (whose 6th argument is use_input_stats)."""
    weight, bias = _module_affine(ctx, weight, bias)
    if ctx.module is not None:
        m = ctx.module
        training = m.training or m.running_mean is None if hasattr(m, "running_mean") else True
        if isinstance(m, nn.modules.instancenorm._InstanceNorm):
            training = m.training or not m.track_running_stats
    ctx.channel_classes(x, 1)              # for its effect: a channel's elements share one scale
    if training:
        ctx.centred.add(ctx.node)
    else:
        name = ctx.node.target if ctx.node.op == "call_module" else ctx.node.name
        ctx.notes.append(f"{name} is in eval mode: analysed as the affine map it computes with its "
                         f"running statistics, which pins its input (call model.train() to analyse "
                         f"the training-time symmetry)")
        ctx.pin(x, reason="eval-mode normalisation with running statistics is affine")
    _note_bias(ctx, bias, 1)               # its own bias is a per-channel constant too
    return _per_channel_out(ctx, _affine(ctx, weight, bias, (x.shape[1],)))


def instance_norm(ctx, x, running_mean=None, running_var=None, weight=None, bias=None,
                  use_input_stats=True, *args, **kwargs):
    return batch_norm(ctx, x, running_mean, running_var, weight, bias, use_input_stats)


def group_norm(ctx, x, num_groups=None, weight=None, bias=None, eps=1e-5):
    weight, bias = _module_affine(ctx, weight, bias)
    if ctx.module is not None:
        num_groups = ctx.module.num_groups
    c = x.shape[1]
    cls = ctx.channel_classes(x, 1).view(num_groups, c // num_groups)
    ctx.classes.union(cls, cls.max(dim=1, keepdim=True).values)   # one scale per group
    if num_groups == c:
        ctx.centred.add(ctx.node)
    _note_bias(ctx, bias, 1)
    return _per_channel_out(ctx, _affine(ctx, weight, bias, (c,)))


def layer_norm(ctx, x, normalized_shape=None, weight=None, bias=None, eps=1e-5):
    weight, bias = _module_affine(ctx, weight, bias)
    if ctx.module is not None:
        normalized_shape = ctx.module.normalized_shape
    k = len(tuple(normalized_shape)) if not isinstance(normalized_shape, int) else 1
    nd = len(x.shape)
    ctx.reduce(x, range(nd - k, nd))                         # one joint scale per normalised vector
    shape = tuple(x.shape[nd - k:])
    if k == 1:
        _note_bias(ctx, bias, nd - 1)
    return ctx.value(_affine(ctx, weight, bias, shape).view((1,) * (nd - k) + shape))


def rms_norm(ctx, x, normalized_shape=None, weight=None, eps=None):
    return layer_norm(ctx, x, normalized_shape, weight, None)


def normalize(ctx, x, p=2.0, dim=1, eps=1e-12, out=None):
    ctx.reduce(x, [dim])
    return ctx.constant()


_register([nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.InstanceNorm1d,
           nn.InstanceNorm2d, nn.InstanceNorm3d, F.batch_norm], batch_norm)
_register([F.instance_norm], instance_norm)
_register([nn.GroupNorm, F.group_norm], group_norm)
_register([nn.LayerNorm, F.layer_norm], layer_norm)
_register([nn.RMSNorm, F.rms_norm], rms_norm)
_register([F.normalize], normalize)
