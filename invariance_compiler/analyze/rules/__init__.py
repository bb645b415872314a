"""The rule registry: op -> rule. Keys are nn.Module classes (their instances become leaves of the
trace), functions (`torch.relu`, `F.conv2d`, `operator.add`) and method names (`"view"`).

An op without a rule is pinned: its inputs and outputs keep scale 1, and the analysis lists it in one
warning. Register a rule when you know better:

    ic.register_rule(MyScaledReLU, ic.rules.passthrough)   # positively homogeneous, elementwise
    ic.register_rule(torch.erf, ic.rules.pin)              # known to break every scale (no warning)
"""
from __future__ import annotations

from typing import Callable, Optional, Union

import torch

__all__ = ["register_rule", "lookup", "passthrough", "pin", "movement"]

_FUNCTIONS: dict = {}
_METHODS: dict[str, Callable] = {}
_MODULES: dict[type, Callable] = {}


def register_rule(target: Union[type, Callable, str], rule: Optional[Callable] = None):
    """Register `rule(ctx, *args, **kwargs)` for an nn.Module subclass, a function or a tensor
    method name. Usable as a decorator: `@register_rule(MyModule)`."""
    def add(rule):
        if isinstance(target, str):
            _METHODS[target] = rule
        elif isinstance(target, type) and issubclass(target, torch.nn.Module):
            _MODULES[target] = rule
        elif callable(target):
            _FUNCTIONS[target] = rule
        else:
            raise TypeError(f"register_rule: target must be an nn.Module subclass, a function or a "
                            f"method name, got {target!r}")
        return rule
    return add(rule) if rule is not None else add


def _register(targets, rule):
    for t in targets:
        register_rule(t, rule)


def lookup(op: str, target, module=None) -> Optional[Callable]:
    if op == "call_module":
        for cls in type(module).__mro__:
            if cls in _MODULES:
                return _MODULES[cls]
        return None
    if op == "call_method":
        return _METHODS.get(target)
    try:
        return _FUNCTIONS.get(target)
    except TypeError:      # unhashable target
        return None


def has_module_rule(module: torch.nn.Module) -> bool:
    return any(cls in _MODULES for cls in type(module).__mro__)


from .elementwise import passthrough, pin  # noqa: E402  (registers as a side effect)
from .movement import movement  # noqa: E402
from . import layers, norms, pooling  # noqa: E402,F401
