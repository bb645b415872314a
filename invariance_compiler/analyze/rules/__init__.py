"""The rule registry: ATen op -> rule (DESIGN §3.2). Keys are OpOverloads (`torch.ops.aten.relu.default`)
or OpOverloadPackets (`torch.ops.aten.relu`, every overload); custom ops defined with torch.library
are keyed the same way (`torch.ops.mylib.op`). A subclass of a known module is just its ops, so it
gets exactly the rules of what its forward does.

An op without a rule pins every class it touches and every parameter it reads, and the analysis
lists it in one warning. Register a rule when you know better:

    ic.register_rule(torch.ops.mylib.scaled_relu, ic.rules.passthrough)   # positively homogeneous
    ic.register_rule(torch.ops.aten.erf, ic.rules.pin)                     # breaks every scale (no warning)

`registered(op, rule)` does the same for the length of a `with` block (tests, experiments).
"""
from __future__ import annotations

import contextlib
from typing import Callable, Optional

import torch

__all__ = ["register_rule", "registered", "lookup", "passthrough", "pin"]

_RULES: dict = {}


def _key(target):
    if isinstance(target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        return target
    raise TypeError(f"register_rule: target must be an ATen or torch.library op "
                    f"(torch.ops.aten.relu, torch.ops.aten.relu.default, torch.ops.mylib.op), got "
                    f"{target!r}. Module classes and Python functions are inlined by torch.export: "
                    f"register the ops their forward calls.")


def register_rule(target, rule: Optional[Callable] = None):
    """Register `rule(ctx, *args, **kwargs)` for an op or one of its overloads. Usable as a
    decorator: `@register_rule(torch.ops.mylib.op)`."""
    def add(rule):
        _RULES[_key(target)] = rule
        return rule
    return add(rule) if rule is not None else add


@contextlib.contextmanager
def registered(target, rule: Callable):
    """register_rule for the length of a with block; the previous rule (or none) comes back after."""
    key = _key(target)
    old = _RULES.get(key, _MISSING)
    _RULES[key] = rule
    try:
        yield rule
    finally:
        if old is _MISSING:
            _RULES.pop(key, None)
        else:
            _RULES[key] = old


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


def _register(targets, rule):
    for t in targets:
        if t is not None:
            _RULES[t] = rule


def lookup(target) -> Optional[Callable]:
    rule = _RULES.get(target)
    if rule is None and isinstance(target, torch._ops.OpOverload):
        rule = _RULES.get(target.overloadpacket)
    return rule


from .elementwise import passthrough, pin  # noqa: E402  (registers as a side effect)
from . import attention, layers, movement, norms, pooling  # noqa: E402,F401  (they register)
