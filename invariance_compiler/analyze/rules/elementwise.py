"""Elementwise ops. Positively homogeneous ops of degree 1 pass classes through; add/sub/max/where
line elements up (their classes merge); products, quotients and powers combine exponents
(λ(x·y) = λ(x) + λ(y), λ(xᵖ) = p·λ(x)); every op that is not positively homogeneous pins."""
from __future__ import annotations

import math
from fractions import Fraction

import torch

from ..value import PIN, ZERO, Value
from . import _register, aten

__all__ = ["passthrough", "pin", "identity"]



def passthrough(ctx, x, *args, **kwargs):
    """f(c·x) = c·f(x) for c > 0, elementwise: the output keeps the input's classes."""
    return ctx.value(ctx.ids(x))


def identity(ctx, x, *args, **kwargs):
    """Copies, casts, aliases: the same values, so a parameter stays that parameter."""
    if x.param is not None and x.ids is None:
        return Value(torch.Size(ctx.real.shape), None, x.param)
    return passthrough(ctx, x)


def pin(ctx, *args, **kwargs):
    """No symmetry survives this op: its tensor inputs and outputs keep scale 1."""
    ctx.pin(args, kwargs, reason=f"{_name(ctx)} is not positively homogeneous of degree 1")
    return ctx.like_real(lambda t: ctx.constant(t.shape))


def shape_only(ctx, *args, **kwargs):
    """zeros_like, ones_like, rand_like, bernoulli(p): the result depends on the shape only."""
    zero = ctx.node.target.overloadpacket in (aten.zeros_like, aten.new_zeros)
    if zero:
        return ctx.like_real(lambda t: Value(t.shape, torch.full((1,) * t.dim(), ZERO)))
    return ctx.like_real(lambda t: ctx.constant(t.shape))


def _name(ctx):
    t = ctx.node.target
    return getattr(t, "__name__", str(t))


def _is_value(x):
    return isinstance(x, Value)


def _is_zero(c):
    return isinstance(c, (int, float, bool)) and c == 0


def add(ctx, a, b, alpha=1):
    if _is_value(a) and _is_value(b):
        return ctx.value(ctx.union(a, b))
    x, c = (a, b) if _is_value(a) else (b, a)
    if _is_zero(c):
        return ctx.value(ctx.ids(x))
    if _negligible_eps(ctx, c):
        return ctx.value(ctx.ids(x))
    ctx.pin(x, reason=f"{_name(ctx)} adds a constant (offsets break scaling)")
    return ctx.constant()


def _negligible_eps(ctx, c) -> bool:
    """`s + eps` right before sqrt/rsqrt (a decomposed norm: x · rsqrt(mean(x²) + eps)) is treated as
    `s`, as the fused normalisers are: the symmetry is exact as eps -> 0 (DESIGN §3.2)."""
    if not isinstance(c, float) or not 0 < c <= 1e-3:
        return False
    users = list(ctx.node.users)
    return bool(users) and all(getattr(u.target, "overloadpacket", None) in (aten.sqrt, aten.rsqrt)
                               for u in users)


def rsub(ctx, a, b, alpha=1):
    return add(ctx, a, b)


def mul(ctx, a, b):
    if not (_is_value(a) and _is_value(b)):
        x = a if _is_value(a) else b
        c = b if x is a else a
        if _is_zero(c):
            return Value(torch.Size(ctx.real.shape), torch.full((1,) * ctx.real.dim(), ZERO))
        return ctx.value(ctx.ids(x))                      # times a Python number
    for p, x in ((a, b), (b, a)):                          # x * parameter: a diagonal weight
        if p.param is not None and p.ids is None and x.param is None and len(p.shape) <= len(ctx.real.shape):
            return _diagonal_weight(ctx, x, p)
    for c, x in ((a, b), (b, a)):                          # x * constant tensor
        if c.param is None and c.is_constant:
            return ctx.value(torch.where(c.ids < PIN, ZERO, ctx.ids(x)))
    return ctx.value(ctx.combine([(1, ctx.ids(a)), (1, ctx.ids(b))]))


def _diagonal_weight(ctx, x, p):
    """out = x * P with P broadcast (LayerScale, a norm's weight written out): P's entry e scales
    out by its own fresh class and divides out the class of the x elements it multiplies."""
    out_nd = len(ctx.real.shape)
    lead = out_nd - len(p.shape)
    fresh = ctx.fresh(math.prod(p.shape)).view(p.shape)
    xs = ctx.full(x).expand(ctx.real.shape)
    dims = list(range(lead)) + [lead + i for i, s in enumerate(p.shape) if s == 1 and ctx.real.shape[lead + i] > 1]
    red = ctx.reduce(Value(ctx.real.shape, xs), dims)
    xcls = red.reshape(red.shape[lead:]).expand(p.shape)
    if not ctx.bind(p, [(+1, fresh), (-1, xcls)]):
        ctx.pin(x, reason="product with a parameter that cannot be bound")
        return ctx.constant()
    return ctx.value(fresh.reshape((1,) * lead + tuple(p.shape)))


def div(ctx, a, b, rounding_mode=None):
    if rounding_mode is not None:
        return pin(ctx, a, b)
    if _is_value(a) and not _is_value(b):
        return ctx.value(ctx.ids(a))
    if not _is_value(a):
        return ctx.value(ctx.combine([(-1, ctx.ids(b))]))
    if b.param is None and b.is_constant:
        return ctx.value(ctx.ids(a))
    return ctx.value(ctx.combine([(1, ctx.ids(a)), (-1, ctx.ids(b))]))


def power(ctx, x, exponent):
    if not _is_value(x):
        return pin(ctx, exponent)
    if isinstance(exponent, (int, float)) and not isinstance(exponent, bool):
        p = Fraction(exponent).limit_denominator(64)
        if float(p) == float(exponent):
            return ctx.value(ctx.combine([(p, ctx.ids(x))]))
    return pin(ctx, x, exponent)


def _scaled_by(coeff):
    def rule(ctx, x, *args, **kwargs):
        return ctx.value(ctx.combine([(coeff, ctx.ids(x))]))
    return rule


def binary_union(ctx, a, b):
    """max/min of two tensors: homogeneous only when both sides share a scale."""
    if _is_value(a) and _is_value(b):
        return ctx.value(ctx.union(a, b))
    x, c = (a, b) if _is_value(a) else (b, a)
    if _is_zero(c):
        return ctx.value(ctx.ids(x))
    ctx.pin(x, reason=f"{_name(ctx)} against a non-zero constant")
    return ctx.constant()


def where(ctx, cond, a, b):
    """The condition is a mask; the two branches must share a scale (0 fits any)."""
    vals = [v for v in (a, b) if _is_value(v)]
    consts = [v for v in (a, b) if not _is_value(v)]
    if any(not _is_zero(c) for c in consts):
        ctx.pin(*vals, reason="where against a non-zero constant")
        return ctx.constant()
    if _is_value(cond) and not cond.is_constant:
        ctx.pin(cond, reason="where's condition is a scaled tensor")
    return ctx.value(ctx.union(*vals)) if vals else ctx.constant()


def masked_fill(ctx, x, mask, value):
    if _is_value(mask) and not mask.is_constant:
        ctx.pin(mask, reason="masked_fill's mask is a scaled tensor")
    if _is_value(value) or not _is_zero(value):
        ctx.pin(x, value, reason="masked_fill with a non-zero value")
        return ctx.constant()
    return ctx.value(ctx.ids(x))


def clamp(ctx, x, min=None, max=None):
    if (min is None or _is_zero(min)) and max is None:
        return ctx.value(ctx.ids(x))                      # clamp(min=0) is ReLU
    return pin(ctx, x)


def threshold(ctx, x, threshold, value):
    if _is_zero(threshold) and _is_zero(value):
        return ctx.value(ctx.ids(x))                      # threshold(x, 0, 0) is ReLU
    return pin(ctx, x)


def compare(ctx, a, b=None):
    """x > 0 does not change when x is scaled; x > c and a > b do unless a and b share one scale."""
    if _is_value(a) and _is_value(b):
        ctx.union(a, b)
    elif not _is_zero(b if _is_value(a) else a):
        ctx.pin(a, b, reason=f"{_name(ctx)} against a non-zero constant")
    return ctx.constant()


def prelu(ctx, x, weight):
    ctx.bind(weight, [])         # the slope is a ratio: it never scales
    if weight is not None and weight.param is not None and _non_negative(ctx.node.args[0]):
        shape = ctx.params[weight.param.name].shape
        ctx.inert[weight.param.name] = torch.arange(shape.numel())   # only ever meets x >= 0
    return ctx.value(ctx.ids(x))


def sign_only(ctx, x, *args, **kwargs):
    """Degree 0: the output does not scale and the input may scale freely (sign, argmax ...)."""
    return ctx.constant()


_NON_NEGATIVE = {aten.relu, aten.relu_, aten.abs, aten.sigmoid, aten.exp, aten.softmax, aten._softmax,
                 aten.hardsigmoid, aten.relu6, aten.softplus}
_KEEPS_SIGN = {aten.max_pool1d, aten.max_pool2d, aten.max_pool3d, aten.max_pool2d_with_indices,
               aten.avg_pool1d, aten.avg_pool2d, aten.avg_pool3d, aten.adaptive_avg_pool1d,
               aten.adaptive_avg_pool2d, aten.adaptive_avg_pool3d, aten.dropout, aten.flatten,
               aten.view, aten.reshape, aten.clone, aten.contiguous, aten._to_copy, aten.tanh,
               aten.gelu, aten.silu, aten.elu, aten.leaky_relu, aten.hardtanh, aten.prelu,
               aten.unsqueeze, aten.squeeze, aten.permute, aten.transpose, aten.alias}


def _non_negative(node) -> bool:
    """Whether `node` is non-negative for every input and weight (a ReLU, through pooling and
    reshapes). Structural, never from the example's values."""
    if not isinstance(node, torch.fx.Node) or node.op != "call_function":
        return False
    packet = getattr(node.target, "overloadpacket", None)
    if packet in _NON_NEGATIVE:
        return True
    if packet is aten.clamp and len(node.args) > 1 and _is_zero(node.args[1]):
        return True
    return packet in _KEEPS_SIGN and bool(node.args) and _non_negative(node.args[0])


_register([aten.relu, aten.relu_, aten.leaky_relu, aten.leaky_relu_, aten.rrelu, aten.dropout,
           aten.dropout_, aten.feature_dropout, aten.feature_dropout_, aten.abs, aten.abs_, aten.neg,
           aten.neg_, aten.positive], passthrough)
_register([aten.clone, aten.contiguous, aten._to_copy, aten.to, aten.type_as, aten.alias,
           aten.detach, aten.detach_, aten.lift_fresh_copy, aten.lift_fresh, aten.clone], identity)
_register([aten.zeros_like, aten.ones_like, aten.full_like, aten.empty_like, aten.rand_like,
           aten.randn_like, aten.randint_like, aten.new_zeros, aten.new_ones, aten.new_empty,
           aten.new_full, aten.bernoulli, aten.bernoulli_, aten.empty_strided, aten.zero_,
           aten.fill_], shape_only)
_register([aten.sigmoid, aten.sigmoid_, aten.tanh, aten.tanh_, aten.exp, aten.exp_, aten.log,
           aten.log1p, aten.expm1, aten.sin, aten.cos, aten.erf, aten.erfc, aten.gelu, aten.gelu_,
           aten.silu, aten.silu_, aten.mish, aten.elu, aten.elu_, aten.selu, aten.celu, aten.softplus,
           aten.relu6, aten.hardtanh, aten.hardtanh_, aten.hardswish, aten.hardswish_,
           aten.hardsigmoid, aten.hardsigmoid_, aten.log_sigmoid, aten.softshrink, aten.hardshrink,
           aten.glu, aten.alpha_dropout, aten.feature_alpha_dropout, aten.softmax, aten._softmax,
           aten.log_softmax, aten._log_softmax, aten.logsumexp, aten.cross_entropy_loss,
           aten.mse_loss, aten.nll_loss, aten.local_response_norm], pin)
_register([aten.add, aten.add_, aten.sub, aten.sub_], add)
_register([aten.rsub], rsub)
_register([aten.mul, aten.mul_, aten.multiply], mul)
_register([aten.div, aten.div_, aten.true_divide], div)
_register([aten.pow, aten.pow_], power)
_register([aten.sqrt, aten.sqrt_], _scaled_by(Fraction(1, 2)))
_register([aten.rsqrt, aten.rsqrt_], _scaled_by(Fraction(-1, 2)))
_register([aten.reciprocal, aten.reciprocal_], _scaled_by(-1))
_register([aten.square], _scaled_by(2))
_register([aten.maximum, aten.minimum, aten.fmax, aten.fmin], binary_union)
_register([aten.where], where)
_register([aten.masked_fill, aten.masked_fill_], masked_fill)
_register([aten.clamp, aten.clamp_, aten.clamp_min, aten.clamp_min_, aten.clip], clamp)
_register([aten.threshold, aten.threshold_], threshold)
_register([aten.gt, aten.lt, aten.ge, aten.le, aten.eq, aten.ne], compare)
_register([aten.prelu, aten._prelu_kernel], prelu)
_register([aten.sign], sign_only)
