"""Normalisers end a class: the scale of what they normalise is absorbed (a normalize generator),
and their affine weight and bias start a fresh class per channel. BatchNorm/InstanceNorm absorb one
scale per channel, LayerNorm and RMSNorm one joint scale per normalised vector, GroupNorm one per
group. Eval-mode BatchNorm with running statistics is an affine map: it pins its input. Which biases
the centring makes inert is proven separately (analyze/inert.py)."""
from __future__ import annotations

import math

import torch

from . import _register, aten

__all__ = ["batch_norm", "group_norm", "layer_norm"]



def _affine(ctx, weight, bias, shape):
    """Output classes of `xhat * weight + bias`; xhat has scale 1, so the affine pair is the producer."""
    if weight is None and bias is None:
        return torch.zeros(shape, dtype=torch.long)
    cls = ctx.fresh(math.prod(shape)).view(shape)
    for p, is_bias in ((weight, False), (bias, True)):
        if p is None:
            continue
        if p.param is not None:
            (ctx.bind_bias if is_bias else lambda v, c: ctx.bind(v, [(+1, c)]))(p, cls)
        elif p.is_constant:
            ctx.classes.pin(cls)
        else:
            ctx.classes.union(cls, ctx.ids(p).reshape(-1)[: cls.numel()].view(shape)
                              if ctx.ids(p).numel() == cls.numel() else ctx.ids(p).reshape(-1)[:1])
    return cls


def _per_channel(ctx, cls, shape=None):
    shape = ctx.real.shape if shape is None else shape
    view = [1] * len(shape)
    view[1 if len(shape) > 1 else 0] = cls.numel()
    return ctx.value(cls.view(view), shape)


def _norm_over_channels(ctx, x, weight, bias, training, what):
    ctx.channel_classes(x, 1)                  # for its effect: a channel's elements share one scale
    if not training:
        ctx.notes.append(f"{ctx.node.name} ({what}) is in eval mode: analysed as the affine map it "
                         f"computes with its running statistics, which pins its input (call "
                         f"model.train() to analyse the training-time symmetry)")
        ctx.pin(x, reason="eval-mode normalisation with running statistics is affine")
    return _per_channel(ctx, _affine(ctx, weight, bias, (x.shape[1],)), x.shape)


def batch_norm(ctx, x, weight, bias, running_mean, running_var, training, *args):
    stats = training or running_mean is None
    return _norm_over_channels(ctx, x, weight, bias, stats, "batch_norm")


def batch_norm_functional(ctx, x, weight, bias, running_mean, running_var, training, *args):
    """_native_batch_norm_legit_functional: (out, mean, rstd, new running mean, new running var);
    the running statistics are buffers (constants to the analysis)."""
    out = batch_norm(ctx, x, weight, bias, running_mean, running_var, training)
    return (out, *[ctx.constant(t.shape) for t in ctx.real[1:]])


def batch_norm_no_training(ctx, x, weight, bias, running_mean, running_var, *args):
    out = _norm_over_channels(ctx, x, weight, bias, False, "batch_norm")
    return (out, *[ctx.constant(t.shape) for t in ctx.real[1:]])


def batch_norm_no_stats(ctx, x, weight, bias, training, *args):
    out = _norm_over_channels(ctx, x, weight, bias, True, "batch_norm")
    return (out, *[ctx.constant(t.shape) for t in ctx.real[1:]])


def native_batch_norm(ctx, x, weight, bias, running_mean, running_var, training, *args):
    out = batch_norm(ctx, x, weight, bias, running_mean, running_var, training)
    return (out, *[ctx.constant(t.shape) for t in ctx.real[1:]])


def instance_norm(ctx, x, weight, bias, running_mean, running_var, use_input_stats, *args):
    """Per sample and channel: one scale per channel is absorbed (the batch shares the weights)."""
    return _norm_over_channels(ctx, x, weight, bias, use_input_stats, "instance_norm")


def group_norm(ctx, x, num_groups, weight=None, bias=None, *args):
    c = x.shape[1]
    cls = ctx.channel_classes(x, 1).view(num_groups, c // num_groups)
    ctx.classes.union(cls, cls.max(dim=1, keepdim=True).values)   # one scale per group
    return _per_channel(ctx, _affine(ctx, weight, bias, (c,)), x.shape)


def native_group_norm(ctx, x, weight, bias, n, c, hw, group, eps):
    out = group_norm(ctx, x, group, weight, bias)
    return (out, *[ctx.constant(t.shape) for t in ctx.real[1:]])


def layer_norm(ctx, x, normalized_shape, weight=None, bias=None, *args):
    k = len(tuple(normalized_shape))
    nd = len(x.shape)
    joint = ctx.reduce(x, range(nd - k, nd))                  # one joint scale per normalised vector
    shape = tuple(x.shape[nd - k:])
    out = ctx.value(_affine(ctx, weight, bias, shape).view((1,) * (nd - k) + shape), x.shape)
    return out, joint


def layer_norm_rule(ctx, x, normalized_shape, weight=None, bias=None, *args):
    return layer_norm(ctx, x, normalized_shape, weight, bias)[0]


def native_layer_norm(ctx, x, normalized_shape, weight, bias, eps):
    """(out, mean, rstd): the mean has the vector's joint class, rstd its inverse."""
    out, joint = layer_norm(ctx, x, normalized_shape, weight, bias)
    mean, rstd = ctx.real[1:]
    return out, ctx.value(joint, mean.shape), ctx.value(ctx.combine([(-1, joint)]), rstd.shape)


def rms_norm(ctx, x, normalized_shape, weight=None, eps=None):
    return layer_norm(ctx, x, normalized_shape, weight, None)[0]


_register([aten.batch_norm, aten.cudnn_batch_norm, aten.miopen_batch_norm], batch_norm)
_register([aten._native_batch_norm_legit_functional], batch_norm_functional)
_register([aten._native_batch_norm_legit_no_training], batch_norm_no_training)
_register([aten._native_batch_norm_legit.no_stats], batch_norm_no_stats)
_register([aten._native_batch_norm_legit.default], batch_norm_functional)
_register([aten.native_batch_norm], native_batch_norm)
_register([aten.instance_norm], instance_norm)
_register([aten.group_norm], group_norm)
_register([aten.native_group_norm], native_group_norm)
_register([aten.layer_norm], layer_norm_rule)
_register([aten.native_layer_norm], native_layer_norm)
_register([aten.rms_norm], rms_norm)
