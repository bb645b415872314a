"""The op registry: ATen op -> everything the analyses know of it (DESIGN §3.2, §3.8). Keys are
OpOverloads (`torch.ops.aten.relu.default`) or OpOverloadPackets (`torch.ops.aten.relu`, every
overload); custom ops defined with torch.library are keyed the same way (`torch.ops.mylib.op`). A
subclass of a known module is just its ops, so it gets exactly the rules of what its forward does.

Each entry is an `OpRules` with one facet per analysis:
    scale     rule(ctx, *args, **kwargs) -> Value(s): how the op moves rescalings (analyze/rules/*)
    adds      start(use, slot, entries) -> pattern: where a parameter read at argument `slot` is
              added (a bias), for the inertness proof (analyze/inert.py)
    inert     step(node, state) -> pattern or KILLED: how an additive perturbation passes the op
              (analyze/inert.py)
    rotation  rule(walk, node): how an orthogonal map of a hidden space passes the op
              (analyze/rotations.py)
A facet that is None is unknown to that analysis, which then assumes the worst: the scale rule pins
what the op touches and the parameters it reads (one warning lists such ops), the inertness proof
leaves the entries unproven, the rotation walk gives up on that space. Register what you know:

    ic.register_rule(torch.ops.mylib.scaled_relu, ic.rules.passthrough)   # positively homogeneous
    ic.register_rule(torch.ops.aten.erf, ic.rules.pin)                     # breaks every scale (no warning)
    ic.rules.register_op(torch.ops.mylib.my_view, scale=..., inert=..., rotation=...)

`registered(op, rule)` does the same for the length of a `with` block (tests, experiments).
"""
from __future__ import annotations

import contextlib
import operator
from dataclasses import dataclass, replace
from typing import Callable, Optional

import torch

__all__ = ["register_rule", "register_op", "registered", "lookup", "OpRules", "passthrough", "pin"]

FACETS = ("scale", "adds", "inert", "rotation")


@dataclass(frozen=True)
class OpRules:
    """What the analyses know of one op (see the module's docstring); None: unknown."""
    scale: Optional[Callable] = None
    adds: Optional[Callable] = None
    inert: Optional[Callable] = None
    rotation: Optional[Callable] = None


_OPS: dict = {}


def _key(target):
    if isinstance(target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        return target
    raise TypeError(f"register_rule: target must be an ATen or torch.library op "
                    f"(torch.ops.aten.relu, torch.ops.aten.relu.default, torch.ops.mylib.op), got "
                    f"{target!r}. Module classes and Python functions are inlined by torch.export: "
                    f"register the ops their forward calls.")


def register_op(target, **facets) -> OpRules:
    """Set some facets of an op's entry (scale=, adds=, inert=, rotation=); the others stay."""
    bad = set(facets) - set(FACETS)
    if bad:
        raise TypeError(f"register_op: unknown facet(s) {sorted(bad)}; the facets are {FACETS}")
    key = target if target is operator.getitem else _key(target)
    entry = replace(_OPS.get(key, OpRules()), **facets)
    _OPS[key] = entry
    return entry


def register_rule(target, rule: Optional[Callable] = None):
    """Register `rule(ctx, *args, **kwargs)` as the scale rule of an op or one of its overloads.
    Usable as a decorator: `@register_rule(torch.ops.mylib.op)`."""
    def add(rule):
        register_op(target, scale=rule)
        return rule
    return add(rule) if rule is not None else add


@contextlib.contextmanager
def registered(target, rule: Optional[Callable] = None, **facets):
    """register_rule (or register_op with facets) for the length of a with block; the previous
    entry (or none) comes back after."""
    key = _key(target)
    old = _OPS.get(key, _MISSING)
    if rule is not None:
        facets["scale"] = rule
    register_op(target, **facets)
    try:
        yield rule
    finally:
        if old is _MISSING:
            _OPS.pop(key, None)
        else:
            _OPS[key] = old


_MISSING = object()


class _Aten:
    """torch.ops.aten, with None for an op this torch build does not have (the rule lists name ops
    of several torch versions)."""

    def __getattr__(self, name):
        try:
            return getattr(torch.ops.aten, name)
        except AttributeError:
            return None


aten = _Aten()


def _register(targets, rule, facet: str = "scale"):
    for t in targets:
        if t is not None:
            register_op(t, **{facet: rule})


def lookup(target, facet: str = "scale") -> Optional[Callable]:
    """The op's `facet` (an OpOverload falls back to its packet's entry)."""
    entry = _OPS.get(target)
    rule = getattr(entry, facet) if entry is not None else None
    if rule is None and isinstance(target, torch._ops.OpOverload):
        entry = _OPS.get(target.overloadpacket)
        rule = getattr(entry, facet) if entry is not None else None
    return rule


from .elementwise import passthrough, pin  # noqa: E402  (registers as a side effect)
from . import attention, layers, movement, norms, pooling  # noqa: E402,F401  (they register)
