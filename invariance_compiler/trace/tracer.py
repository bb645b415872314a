"""torch.fx symbolic tracing with errors a person can act on.

Leaves are torch.nn's own modules (fx's default) plus every module class with a registered rule; all
other modules are traced through. When tracing fails we name the innermost module that was being
traced and the ways out, instead of fx's raw traceback."""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.fx
import torch.nn as nn

from ..analyze.rules import has_module_rule

__all__ = ["trace", "example_inputs_for", "TraceFailure"]


class TraceFailure(RuntimeError):
    """The model could not be symbolically traced; the message names the module and the fixes."""


class _Tracer(torch.fx.Tracer):
    def __init__(self):
        super().__init__()
        self.stack: list[str] = []
        self.failed_in: Optional[tuple[str, str]] = None

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return has_module_rule(m) or super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        self.stack.append(self.path_of_module(m))
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:
                self.failed_in = (self.stack[-1], type(m).__name__)
            raise
        finally:
            self.stack.pop()


def trace(model: nn.Module, concrete_args: Optional[dict[str, Any]] = None) -> torch.fx.GraphModule:
    if not isinstance(model, nn.Module):
        raise TypeError(f"invariance_compiler works on torch.nn.Module instances, got {type(model).__name__}")
    tracer = _Tracer()
    try:
        graph = tracer.trace(model, concrete_args=concrete_args)
    except Exception as err:  # fx raises TraceError, TypeError, AttributeError ... depending on the code
        where, kind = tracer.failed_in or ("", type(model).__name__)
        place = f"module '{where}' ({kind})" if where else f"the forward of {kind}"
        raise TraceFailure(
            f"could not trace {place} of {type(model).__name__}: {type(err).__name__}: {err}\n"
            f"Ways out: (1) if control flow depends on a Python argument, pass it with "
            f"concrete_args={{'name': value}}; (2) if it depends on tensor values, move it out of "
            f"forward or into a leaf module, and register a rule for that module: "
            f"ic.register_rule({kind}, ic.rules.pin) treats it as an opaque op without symmetry, "
            f"ic.register_rule({kind}, ic.rules.passthrough) as a positively homogeneous elementwise "
            f"op.") from err
    name = type(model).__name__
    gm = torch.fx.GraphModule(tracer.root, graph, name)
    gm.graph.eliminate_dead_code()   # unused branches have no effect on the output
    gm.recompile()
    return gm


_SHAPE_FREE = (nn.Flatten, nn.Dropout, nn.Identity)


def example_inputs_for(gm: torch.fx.GraphModule, model: nn.Module) -> tuple:
    """Inputs for a model whose input shape follows from its first layer (a Linear)."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    params = list(model.parameters())
    dtype = params[0].dtype if params else torch.get_default_dtype()
    first = None
    if len(placeholders) == 1:
        node = placeholders[0]
        while len(node.users) == 1:
            node = next(iter(node.users))
            target = gm.get_submodule(node.target) if node.op == "call_module" else None
            if isinstance(target, _SHAPE_FREE) or node.target in ("flatten", torch.flatten):
                continue
            first = target if target is not None else node.target
            break
    if isinstance(first, nn.Linear):
        return (torch.randn(2, first.in_features, dtype=dtype),)
    what = type(first).__name__ if isinstance(first, nn.Module) else (
        "several inputs" if len(placeholders) != 1 else "its first op")
    raise ValueError(
        f"cannot infer the input shape of {type(model).__name__}: only a model whose first layer is "
        f"an nn.Linear fixes it, and this one starts with {what}. Pass example inputs, e.g. "
        f"ic.analyze(model, example_inputs=(torch.randn(2, 3, 32, 32),)).")
