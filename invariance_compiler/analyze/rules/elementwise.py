"""Elementwise ops. Positively homogeneous ops of degree 1 pass classes through; add/sub/max/where
line elements up (their classes merge); a product of two scaled tensors, and every op that is not
positively homogeneous of degree 1, pins."""
from __future__ import annotations

import math
import operator

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

from ..value import PIN, ZERO, Value
from . import _register

__all__ = ["passthrough", "pin"]


def passthrough(ctx, x, *args, **kwargs):
    """f(c·x) = c·f(x) for c > 0, elementwise: the output keeps the input's classes."""
    return ctx.value(ctx.ids(x))


def identity(ctx, x, *args, **kwargs):
    """Copies and casts: the same values, so a parameter stays that parameter."""
    if x.param is not None and x.ids is None:
        return Value(torch.Size(ctx.real.shape), None, x.param)
    return passthrough(ctx, x)


def pin(ctx, *args, **kwargs):
    """No symmetry survives this op: its tensor inputs and outputs keep scale 1."""
    ctx.pin(args, kwargs, reason=f"{_name(ctx)} is not positively homogeneous of degree 1")
    return ctx.like_real(lambda t: ctx.constant(t.shape))


def _name(ctx):
    t = ctx.node.target
    if ctx.node.op == "call_module":
        return type(ctx.module).__name__
    return getattr(t, "__name__", str(t))


def _is_value(x):
    return isinstance(x, Value)


def _scalar(x):
    return isinstance(x, (int, float, bool))


def add(ctx, a, b=None, *args, alpha=1, other=None, **kwargs):
    b = other if b is None else b
    if _is_value(a) and _is_value(b):
        return ctx.value(ctx.union(a, b))
    x, c = (a, b) if _is_value(a) else (b, a)
    if _scalar(c) and c == 0:
        return ctx.value(ctx.ids(x))
    ctx.pin(x, reason=f"{_name(ctx)} adds a constant (offsets break scaling)")
    return ctx.constant()


def mul(ctx, a, b=None, other=None, **kwargs):
    b = other if b is None else b
    if not (_is_value(a) and _is_value(b)):
        x = a if _is_value(a) else b
        return ctx.value(ctx.ids(x))                      # times a Python number
    for p, x in ((a, b), (b, a)):                          # x * parameter: a diagonal weight
        if p.param is not None and p.ids is None and x.param is None:
            return _diagonal_weight(ctx, x, p)
    for c, x in ((a, b), (b, a)):                          # x * constant tensor
        if c.is_constant:
            return ctx.value(torch.where(c.ids < PIN, ZERO, ctx.ids(x)))
    ctx.pin(a, b, reason="product of two scaled tensors")
    return ctx.constant()


def _diagonal_weight(ctx, x, p):
    """out = x * P with P broadcast: P's entry e scales out by its own fresh class and divides out
    the class of the x elements it multiplies (like a diagonal Linear)."""
    out_nd = len(ctx.real.shape)
    lead = out_nd - len(p.shape)
    fresh = ctx.fresh(math.prod(p.shape)).view(p.shape)
    xs = ctx.full(x).expand(ctx.real.shape)
    # x's classes, reduced onto P's positions: union over dims where P broadcasts
    dims = list(range(lead)) + [lead + i for i, s in enumerate(p.shape) if s == 1 and ctx.real.shape[lead + i] > 1]
    red = ctx.reduce(Value(ctx.real.shape, xs), dims)
    xcls = red.reshape(red.shape[lead:]).expand(p.shape)
    if not ctx.bind(p, [(+1, fresh), (-1, xcls)]):
        ctx.pin(x, reason="product of two scaled tensors")
        return ctx.constant()
    return ctx.value(fresh.reshape((1,) * lead + tuple(p.shape)))


def div(ctx, a, b=None, other=None, **kwargs):
    b = other if b is None else b
    if _is_value(a) and not _is_value(b):
        return ctx.value(ctx.ids(a))
    if _is_value(a) and _is_value(b) and b.is_constant:
        return ctx.value(ctx.ids(a))
    ctx.pin(a, b, reason=f"{_name(ctx)} divides by a scaled tensor")
    return ctx.constant()


def binary_union(ctx, a, b=None, *args, other=None, **kwargs):
    """max/min/where of two tensors: homogeneous only when both sides share a scale."""
    b = other if b is None else b
    if _is_value(a) and _is_value(b):
        return ctx.value(ctx.union(a, b))
    x, c = (a, b) if _is_value(a) else (b, a)
    if _scalar(c) and c == 0:
        return ctx.value(ctx.ids(x))
    ctx.pin(x, reason=f"{_name(ctx)} against a non-zero constant")
    return ctx.constant()


def where(ctx, cond, a, b=None, *args, **kwargs):
    vals = [v for v in (a, b) if _is_value(v)]
    consts = [v for v in (a, b) if not _is_value(v)]
    if any(not (_scalar(c) and c == 0) for c in consts):
        ctx.pin(*vals, reason="torch.where against a non-zero constant")
        return ctx.constant()
    return ctx.value(ctx.union(*vals)) if vals else ctx.constant()


def clamp(ctx, x, min=None, max=None, **kwargs):
    if (min is None or (_scalar(min) and min == 0)) and max is None:
        return ctx.value(ctx.ids(x))                      # clamp(min=0) is ReLU
    return pin(ctx, x)


def power(ctx, x, exponent=None, **kwargs):
    if _scalar(exponent) and exponent == 1:
        return ctx.value(ctx.ids(x))
    return pin(ctx, x, exponent)


def prelu(ctx, x, weight=None, **kwargs):
    weight = ctx.param_value(ctx.module.weight) if ctx.module is not None else weight
    ctx.bind(weight, [])         # the slope is a ratio: it never scales
    if weight is not None and weight.param is not None and _non_negative(ctx, ctx.node.args[0]):
        ctx.bindings[weight.param.name].inert = True    # the slope only ever meets negative inputs
    return ctx.value(ctx.ids(x))


_NON_NEGATIVE = (torch.relu, F.relu, torch.abs, torch.sigmoid, F.sigmoid, torch.exp, torch.softmax,
                 F.softmax, F.relu6, F.softplus, "relu", "abs", "sigmoid", "exp", "softmax")
_NON_NEGATIVE_MODULES = (nn.ReLU, nn.ReLU6, nn.Sigmoid, nn.Softmax, nn.Softplus)
# non-negative in, non-negative out: pooling, reshapes, and activations that are the identity or
# increasing through 0 on x >= 0
_KEEPS_SIGN = (F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
               F.adaptive_max_pool2d, F.adaptive_avg_pool2d, F.dropout, torch.flatten, torch.tanh,
               F.tanh, F.gelu, F.silu, F.elu, F.leaky_relu, F.hardtanh, F.prelu, "flatten", "view",
               "reshape", "contiguous", "tanh")
_KEEPS_SIGN_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d,
                       nn.AvgPool3d, nn.AdaptiveMaxPool2d, nn.AdaptiveAvgPool2d, nn.Dropout,
                       nn.Flatten, nn.Identity, nn.Tanh, nn.GELU, nn.SiLU, nn.ELU, nn.LeakyReLU,
                       nn.PReLU, nn.Hardtanh)


def _non_negative(ctx, node) -> bool:
    """Whether `node` is non-negative for every input and weight (a ReLU, through pooling and
    reshapes). Structural, never from the example's values."""
    if not isinstance(node, torch.fx.Node):
        return False
    if node.op == "call_module":
        m = ctx.gm.get_submodule(node.target)
        if isinstance(m, _NON_NEGATIVE_MODULES):
            return True
        return isinstance(m, _KEEPS_SIGN_MODULES) and _non_negative(ctx, node.args[0])
    if node.op in ("call_function", "call_method"):
        if node.target in _NON_NEGATIVE:
            return True
        return node.target in _KEEPS_SIGN and bool(node.args) and _non_negative(ctx, node.args[0])
    return False


_register([torch.relu, torch.relu_, F.relu, F.relu_, F.leaky_relu, F.leaky_relu_, F.rrelu, F.dropout,
           F.dropout1d, F.dropout2d, F.dropout3d, F.feature_alpha_dropout, torch.abs, torch.neg,
           operator.neg, operator.pos, "relu", "relu_", "abs", "neg",
           nn.ReLU, nn.LeakyReLU, nn.RReLU, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d],
          passthrough)
_register(["contiguous", "clone", "detach", "float", "double", "half", "bfloat16", "to", "type_as",
           "cpu", "cuda", "requires_grad_", nn.Identity, torch.clone, torch.detach], identity)
_register([torch.sigmoid, torch.tanh, torch.exp, torch.log, torch.sqrt, torch.rsqrt, torch.sin,
           torch.cos, torch.erf, torch.softmax, torch.log_softmax, torch.logsumexp, torch.var,
           torch.prod, torch.reciprocal, torch.square,
           F.sigmoid, F.tanh, F.gelu, F.silu, F.mish, F.elu, F.selu, F.celu, F.softplus, F.relu6,
           F.hardtanh, F.hardswish, F.hardsigmoid, F.logsigmoid, F.softsign, F.tanhshrink,
           F.softmax, F.log_softmax, F.softmin, F.threshold, F.hardshrink, F.softshrink, F.glu,
           F.alpha_dropout, F.cross_entropy, F.mse_loss, F.nll_loss, F.local_response_norm,
           "sigmoid", "tanh", "exp", "log", "sqrt", "rsqrt", "softmax", "log_softmax", "var",
           "prod", "reciprocal", "square", "sin", "cos", "erf", "exp_", "sigmoid_", "tanh_",
           nn.Sigmoid, nn.Tanh, nn.GELU, nn.SiLU, nn.Mish, nn.ELU, nn.SELU, nn.CELU, nn.Softplus,
           nn.ReLU6, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.LogSigmoid, nn.Softsign,
           nn.Tanhshrink, nn.Softmax, nn.LogSoftmax, nn.Softmin, nn.Threshold, nn.Hardshrink,
           nn.Softshrink, nn.GLU, nn.AlphaDropout, nn.LocalResponseNorm], pin)
_register([operator.add, operator.iadd, operator.sub, operator.isub, torch.add, torch.sub,
           torch.subtract, "add", "add_", "sub", "sub_"], add)
_register([operator.mul, operator.imul, torch.mul, torch.multiply, "mul", "mul_"], mul)
_register([operator.truediv, operator.itruediv, torch.div, torch.true_divide, "div", "div_"], div)
_register([torch.maximum, torch.minimum, torch.fmax, torch.fmin, "maximum", "minimum"], binary_union)
_register([torch.where, "where"], where)
_register([torch.clamp, torch.clamp_min, torch.clip, "clamp", "clamp_min", "clip", "clamp_"], clamp)
_register([operator.pow, torch.pow, "pow"], power)
_register([F.prelu, torch.prelu, nn.PReLU], prelu)
