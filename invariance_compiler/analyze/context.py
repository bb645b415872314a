"""What a rule sees: the node, its real output, and helpers that record classes, unions, relations,
pins and parameter bindings. A rule is `rule(ctx, *args, **kwargs) -> Value | tuple[Value, ...]`,
called with the ATen op's arguments: a `Value` for every tensor argument, the concrete object for
everything else (the real arguments are in `ctx.real_args`)."""
from __future__ import annotations

import math
from fractions import Fraction
from typing import Any, Optional, Sequence

import torch
import torch.fx

from .classes import ClassTable
from .value import PIN, ZERO, ParamView, Value, compact, pinned_ids

__all__ = ["Context", "Binding"]

Factors = list  # list[tuple[int, torch.Tensor]]: (sign, class ids broadcastable to the parameter's shape)
UNSET = -2      # an entry of a partly bound parameter that no use has reached (yet)


class Binding:
    """How one parameter's entries scale: exponent(e) = sum of sign * λ(class) over its factors.
    The first use of a parameter fixes the factors; a later use must agree (unions) or pins. A
    parameter used through slices (nn.MultiheadAttention's in_proj_weight) is bound slice by slice:
    its factors are then full-shape, UNSET where no use has reached."""

    def __init__(self, name: str, shape: torch.Size, factors: Factors, node: str):
        self.name, self.shape, self.factors, self.nodes = name, shape, factors, [node]

    @property
    def signature(self):
        return tuple(sorted(s for s, _ in self.factors))


class Context:
    def __init__(self, classes: ClassTable, params: dict[str, torch.nn.Parameter]):
        self.classes = classes
        self.params = params                      # canonical name -> Parameter
        self.bindings: dict[str, Binding] = {}
        self.pins: list[tuple[str, str]] = []     # (node name, reason)
        self.notes: list[str] = []                # semantics worth telling the user (eval-mode BN ...)
        self.additive: set[str] = set()           # parameters added, not multiplied (biases, β)
        self.inert: dict[str, torch.Tensor] = {}  # parameter -> flat entries proven not to matter
        self.gm: Optional[torch.fx.GraphModule] = None
        self.node: Optional[torch.fx.Node] = None
        self.real: Any = None                     # the node's real output
        self.real_args: tuple = ()
        self.real_kwargs: dict = {}

    # ---- values -------------------------------------------------------------------------------
    def ids(self, v: Value) -> torch.Tensor:
        """Compact ids of v. A raw parameter used as an ordinary tensor gets one fresh class per
        entry, bound with exponent +1 (its scale is its own); a view that repeats entries
        (`cls_token.expand(B, -1, -1)`) repeats their classes."""
        if v.ids is None:
            if v.param.entries is None:
                fresh = self.classes.fresh(math.prod(v.shape)).view(v.shape)
            else:
                uniq, inverse = v.param.entries.reshape(-1).unique(return_inverse=True)
                fresh = self.classes.fresh(uniq.numel())[inverse].view(v.shape)
            v.ids = fresh if self.bind(v, [(+1, fresh)]) else pinned_ids(len(v.shape))
            v.ids = compact(v.ids)
        return v.ids

    def full(self, v: Value) -> torch.Tensor:
        return self.ids(v).expand(v.shape)

    def value(self, ids: torch.Tensor, shape: Optional[Sequence[int]] = None) -> Value:
        """A Value of the node's (single) real output, or of `shape`."""
        shape = torch.Size(self.real.shape if shape is None else shape)
        while ids.dim() < len(shape):
            ids = ids.unsqueeze(0)
        return Value(shape, compact(ids))

    def constant(self, shape=None) -> Value:
        shape = self.real.shape if shape is None else shape
        return Value(torch.Size(shape), pinned_ids(len(shape)))

    def like_real(self, make) -> Any:
        """Map make(tensor) over the tensors of the node's real output structure."""
        return _map_tensors(self.real, make)

    # ---- classes ------------------------------------------------------------------------------
    def fresh(self, n: int) -> torch.Tensor:
        return self.classes.fresh(n)

    def union(self, *values: Value) -> torch.Tensor:
        out = None
        for v in values:
            ids = self.ids(v)
            out = ids if out is None else self.classes.union(out, ids)
        return out

    def pin(self, *values: Any, reason: str) -> None:
        hit = False
        for v in _values_in(values):
            hit |= self.classes.pin(self.ids(v))
        if hit:
            self.pins.append((self.node.name if self.node is not None else "?", reason))

    def combine(self, terms: Sequence[tuple[Any, torch.Tensor]]) -> torch.Tensor:
        """Ids whose λ is Σ coeff · λ(ids) elementwise (a product, quotient or power of scaled
        tensors): a fresh class per element of the broadcast, tied by a relation. An element that
        is exactly zero in a factor with positive power stays ZERO; constant factors drop out."""
        live = [(Fraction(c), ids) for c, ids in terms if c != 0 and bool((ids > PIN).any())]
        shape = torch.broadcast_shapes(*[ids.shape for _, ids in terms])
        zero = torch.zeros(shape, dtype=torch.bool)
        for c, ids in terms:
            if c > 0:
                zero = zero | (ids == ZERO)
        if not live:
            out = torch.zeros(shape, dtype=torch.long)
        elif len(live) == 1 and live[0][0] == 1:
            out = live[0][1].expand(shape).clone()
        else:
            bshape = torch.broadcast_shapes(*[ids.shape for _, ids in live])
            fresh = self.fresh(math.prod(bshape)).view(bshape)
            self.classes.relate([(Fraction(1), fresh)] + [(-c, ids) for c, ids in live])
            out = fresh.expand(shape).clone()
        return compact(torch.where(zero, ZERO, out) if bool(zero.any()) else out)

    def reduce(self, v: Value, dims: Sequence[int], ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Union the classes along `dims` (every slice shares one scale); returns the ids with those
        dims reduced to size 1."""
        ids = self.ids(v) if ids is None else ids
        dims = sorted({d % ids.dim() for d in dims}) if ids.dim() else []
        dims = [d for d in dims if ids.size(d) > 1]
        if not dims:
            return ids
        keep = [d for d in range(ids.dim()) if d not in dims]
        moved = ids.permute(*keep, *dims)
        flat = moved.reshape(*moved.shape[: len(keep)], -1)            # (..., K)
        rep = flat.max(dim=-1, keepdim=True).values                      # max skips ZERO
        self.classes.union(flat, rep)
        # keep-dims stay in order and reduced dims are size 1 now, so a reshape puts them back
        return rep.reshape([ids.size(d) if d in keep else 1 for d in range(ids.dim())])

    def channel_classes(self, v: Value, dim: int) -> torch.Tensor:
        """One class per index of `dim` (1-D, length shape[dim]): every element of a channel shares
        the scale a weight slice multiplies."""
        ids = self.ids(v)
        dim = dim % len(v.shape)
        others = [d for d in range(ids.dim()) if d != dim]
        red = self.reduce(v, others)
        return red.reshape(-1).expand(v.shape[dim]).contiguous() if red.numel() == 1 else red.reshape(-1)

    # ---- parameters ---------------------------------------------------------------------------
    def parameter(self, name: str) -> Value:
        """A trainable parameter is a lazy ParamView. A frozen one (requires_grad=False) must stay
        exactly as it is while the rest trains, so it is a constant: its exponent is 0 and the
        classes around it merge or pin instead of moving it."""
        p = self.params[name]
        if p.requires_grad and p.is_floating_point():
            return Value(p.shape, None, ParamView(name))
        self.bindings.setdefault(name, Binding(name, p.shape, [], "?"))
        return Value(p.shape, pinned_ids(p.dim()))

    def bind_bias(self, v: Optional[Value], cls: torch.Tensor) -> bool:
        """bind() for a parameter that is added to the output (it reads the constant 1)."""
        if v is not None and v.param is not None:
            self.additive.add(v.param.name)
        return self.bind(v, [(+1, cls)])

    def bind(self, v: Optional[Value], factors: Factors) -> bool:
        """Record the exponent of the parameter behind `v` (factors in v's shape). When v is not a
        parameter but computed from some (a bias assembled by cat from parameters and a zero
        buffer, as EVA-02's qkv bias): a tensor added to the output (one +1 factor) takes the
        classes it is added to, True; otherwise False, with its classes and the factors' pinned.
        Its own classes must be tied either way: left free, they would be generators that move the
        bias alone."""
        if v is None:
            return True
        if v.param is None:
            if v.ids is not None:
                if len(factors) == 1 and factors[0][0] == +1:
                    self.classes.union(self.ids(v), factors[0][1])
                    return True
                self.classes.pin(self.ids(v))
                for _, cls in factors:
                    self.classes.pin(cls)
            return False
        name = v.param.name
        shape = self.params[name].shape
        mapped = [(s, self._to_param_shape(v, cls, shape)) for s, cls in factors]
        old = self.bindings.get(name)
        if old is None:
            self.bindings[name] = Binding(name, shape, mapped, self.node.name)
            return True
        old.nodes.append(self.node.name)
        new_sig = tuple(sorted(s for s, _ in mapped))
        if new_sig == old.signature:      # same structure: each factor must name the same class
            merged = []
            for (s, c1), (_, c2) in zip(sorted(old.factors, key=lambda f: f[0]),
                                          sorted(mapped, key=lambda f: f[0])):
                if bool((c1 == UNSET).any()) or bool((c2 == UNSET).any()):
                    a, b = torch.broadcast_tensors(c1, c2)
                    both = (a != UNSET) & (b != UNSET)
                    self.classes.union(a[both], b[both])
                    merged.append((s, torch.where(a == UNSET, b, a)))
                else:
                    self.classes.union(c1, c2)
                    merged.append((s, c1))
            old.factors = merged
            return True
        if not any(bool((c == UNSET).any()) for _, c in old.factors + mapped):
            # two uses that scale the entries differently (a tied embedding and output head): each
            # entry's exponent must agree, a relation per entry between the two uses' classes
            self.classes.relate([(s, c) for s, c in old.factors] + [(-s, c) for s, c in mapped])
            return True
        for _, cls in old.factors + mapped:
            self.classes.pin(cls[cls != UNSET])
        old.factors = [(s, torch.where(c == UNSET, PIN, c)) for s, c in old.factors]
        self.pins.append((self.node.name, f"parameter {name} is used in two incompatible ways"))
        return True

    def _to_param_shape(self, v: Value, cls: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """Factor ids in the parameter's own shape. A view that repeats an entry gives it one class:
        the classes of its copies merge."""
        while cls.dim() < len(v.shape):
            cls = cls.unsqueeze(0)
        if v.param.entries is None:
            return cls
        entries = v.param.entries.reshape(-1)
        flat = cls.expand(v.shape).reshape(-1)
        n = math.prod(shape)
        out = torch.full((n,), UNSET, dtype=torch.long)
        out[entries] = flat
        if entries.unique().numel() != entries.numel():
            self.classes.union(out[entries], flat)
        return out.view(shape) if bool((out == UNSET).any()) else compact(out.view(shape))


def _map_tensors(obj, fn):
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, (list, tuple)):
        out = [_map_tensors(o, fn) for o in obj]
        return type(obj)(out) if not hasattr(obj, "_fields") else type(obj)(*out)
    if isinstance(obj, dict):
        return {k: _map_tensors(o, fn) for k, o in obj.items()}
    return obj


def has_tensor(obj) -> bool:
    if isinstance(obj, torch.Tensor):
        return True
    if isinstance(obj, (list, tuple)):
        return any(has_tensor(o) for o in obj)
    if isinstance(obj, dict):
        return any(has_tensor(o) for o in obj.values())
    return False


def _values_in(obj):
    if isinstance(obj, Value):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            yield from _values_in(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _values_in(o)
