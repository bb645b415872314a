"""The analysis pass: an fx.Interpreter that runs the real ops on the example inputs (so every size
and shape is concrete) and, beside each real value, the op's rule on abstract values. The abstract
value of node n lands in n.meta["ic_value"]."""
from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.fx
from torch.fx.node import map_aggregate

from .classes import ClassTable
from .context import Context, _map_tensors, has_tensor
from .rules import lookup
from .rules.norms import mark_inert_biases
from .value import Value, pinned_ids

__all__ = ["SymmetryPass", "SymmetryWarning"]


class SymmetryWarning(UserWarning):
    """Something was pinned because the analysis does not understand it."""


class SymmetryPass(torch.fx.Interpreter):
    def __init__(self, gm: torch.fx.GraphModule, params: dict[str, torch.nn.Parameter]):
        super().__init__(gm)
        self.ctx = Context(ClassTable(), params)
        self.ctx.gm = gm
        self.param_ids = {id(p): name for name, p in params.items()}
        self.unknown: list[tuple[str, str]] = []      # (op, node name)
        self.abstract: dict[torch.fx.Node, Any] = {}

    def run_node(self, n: torch.fx.Node) -> Any:
        real = super().run_node(n)
        ctx = self.ctx
        ctx.node, ctx.real = n, real
        ctx.module = self.module.get_submodule(n.target) if n.op == "call_module" else None
        ctx.args = map_aggregate(n.args, self._abstract_of)
        ctx.kwargs = map_aggregate(n.kwargs, self._abstract_of)
        ctx.real_args, ctx.real_kwargs = self.fetch_args_kwargs_from_env(n)
        try:
            out = self._abstract_node(n, real)
        except Exception as err:
            raise RuntimeError(f"invariance_compiler: the rule for node '{n.name}' "
                               f"({n.format_node()}) failed: {type(err).__name__}: {err}") from err
        self.abstract[n] = out
        n.meta["ic_value"] = out
        return real

    def _abstract_of(self, a):
        return self.abstract[a] if isinstance(a, torch.fx.Node) else a

    def _abstract_node(self, n, real):
        ctx = self.ctx
        if n.op == "placeholder":
            return _map_tensors(real, lambda t: Value(t.shape, pinned_ids(t.dim())))
        if n.op == "get_attr":
            name = self.param_ids.get(id(real))
            if name is not None:
                return self.ctx.parameter(name)
            return _map_tensors(real, lambda t: Value(t.shape, pinned_ids(t.dim())))
        if n.op == "output":
            ctx.pin(ctx.args, reason="model output")
            return None
        if not has_tensor(real):
            return real                     # sizes, shapes, Python numbers: the value is the abstraction
        rule = lookup(n.op, n.target, ctx.module)
        if rule is None:
            self.unknown.append((_op_name(n, ctx.module), n.name))
            ctx.pin(ctx.args, ctx.kwargs, reason=f"no rule for {_op_name(n, ctx.module)}")
            return ctx.like_real(lambda t: ctx.constant(t.shape))
        return rule(ctx, *ctx.args, **ctx.kwargs)

    def analyse(self, *inputs):
        with torch.no_grad():
            self.run(*inputs)
        mark_inert_biases(self.ctx)
        if self.unknown:
            ops = sorted({op for op, _ in self.unknown})
            where = ", ".join(f"{op} (node {node})" for op, node in self.unknown[:12])
            warnings.warn(
                f"invariance_compiler: no symmetry rule for {len(ops)} op(s): {', '.join(ops)}; "
                f"pinned where used: {where}. If an op is positively homogeneous of degree 1 and "
                f"elementwise, register it: ic.register_rule(<op>, ic.rules.passthrough); to "
                f"silence this for an op that breaks scaling: ic.register_rule(<op>, ic.rules.pin).",
                SymmetryWarning, stacklevel=3)
        return self.ctx


def _op_name(n: torch.fx.Node, module) -> str:
    if n.op == "call_module":
        return type(module).__name__
    if n.op == "call_method":
        return f"Tensor.{n.target}"
    mod = getattr(n.target, "__module__", None) or ""
    return f"{mod}.{getattr(n.target, '__name__', str(n.target))}".lstrip(".")
