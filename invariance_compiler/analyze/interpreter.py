"""The analysis pass: an fx.Interpreter over the exported ATen graph that runs the real ops on the
example inputs (so every size and shape is concrete) and, beside each real value, the op's rule on
abstract values. The abstract value of node n lands in n.meta["ic_value"].

An op without a rule pins every class it touches and every parameter it reads. An op whose inputs
are all constants (masks, positions, RoPE's cos/sin) has a constant output whatever it computes, so
it needs no rule."""
from __future__ import annotations

import dataclasses
import operator
import warnings
from typing import Any

import torch
import torch.fx
from torch.fx.node import map_aggregate

from ..trace import Captured
from .classes import ClassTable
from .context import Context, _map_tensors, _values_in, has_tensor
from .rules import lookup
from .value import Value, pinned_ids

__all__ = ["SymmetryPass", "SymmetryWarning"]

_SHAPE_QUERIES = {"sym_size", "sym_numel", "sym_stride", "sym_storage_offset", "size", "stride",
                  "dim", "numel", "_assert_tensor_metadata", "_assert_scalar", "sym_constrain_range_for_size"}


_KNOWN_LIMIT = 1 << 20              # integer constants whose values rules may read (position ids)


class SymmetryWarning(UserWarning):
    """Something was pinned because the analysis does not understand it."""


class SymmetryPass(torch.fx.Interpreter):
    def __init__(self, captured: Captured, params: dict[str, torch.nn.Parameter], user_outputs: set):
        super().__init__(captured.gm)
        self.captured = captured
        self.ctx = Context(ClassTable(), params)
        self.ctx.gm = captured.gm
        self.user_outputs = user_outputs             # names of output args the user sees
        self.unknown: list[tuple[str, str]] = []     # (op, node name)
        self.abstract: dict[torch.fx.Node, Any] = {}
        self.fixed = captured.fixed_nodes()          # nodes whose value is the same at every call

    def run_node(self, n: torch.fx.Node) -> Any:
        real = super().run_node(n)
        ctx = self.ctx
        ctx.node, ctx.real = n, real
        ctx.args = map_aggregate(n.args, self._abstract_of)
        ctx.kwargs = map_aggregate(n.kwargs, self._abstract_of)
        ctx.real_args, ctx.real_kwargs = self.fetch_args_kwargs_from_env(n)
        try:
            out = self._abstract_node(n, real)
        except Exception as err:
            raise RuntimeError(f"invariance_compiler: the rule for node '{n.name}' "
                               f"({n.format_node()}) failed: {type(err).__name__}: {err}") from err
        if n in self.fixed and isinstance(out, Value) and isinstance(real, torch.Tensor) \
                and not real.is_floating_point() and real.numel() <= _KNOWN_LIMIT:
            out = dataclasses.replace(out, known=real.clone())   # a new Value: rules may return their input's
        self.abstract[n] = out
        n.meta["ic_value"] = out
        return real

    def _abstract_of(self, a):
        return self.abstract[a] if isinstance(a, torch.fx.Node) else a

    def _abstract_node(self, n, real):
        ctx = self.ctx
        if n.op == "placeholder":
            name = self.captured.params.get(n.name)
            if name is not None:
                return ctx.parameter(name)
            return _map_tensors(real, lambda t: Value(t.shape, pinned_ids(t.dim())))
        if n.op == "output":
            outs = n.args[0] if isinstance(n.args[0], (list, tuple)) else [n.args[0]]
            seen = [self.abstract[o] for o in outs if isinstance(o, torch.fx.Node) and o.name in self.user_outputs]
            ctx.pin(seen, reason="model output")
            return None
        if n.op != "call_function":
            return _map_tensors(real, lambda t: ctx.constant(t.shape))
        values = list(_values_in((ctx.args, ctx.kwargs)))
        if not has_tensor(real):
            name = getattr(n.target, "__name__", str(n.target)).split(".")[0]
            if values and name not in _SHAPE_QUERIES and n.target is not operator.getitem:
                ctx.pin(values, reason=f"{_op_name(n)} turns a tensor into a Python value")
            return real                      # sizes, shapes, Python numbers: the value is the abstraction
        if n.target is not operator.getitem and all(v.param is None and v.is_constant for v in values):
            return ctx.like_real(lambda t: ctx.constant(t.shape))    # arange, masks, cos/sin of RoPE
        rule = lookup(n.target)
        if rule is None:
            self.unknown.append((_op_name(n), n.name))
            ctx.pin(ctx.args, ctx.kwargs, reason=f"no rule for {_op_name(n)}")
            return ctx.like_real(lambda t: ctx.constant(t.shape))
        return rule(ctx, *ctx.args, **ctx.kwargs)

    def analyse(self, *inputs):
        with torch.no_grad():
            self.run(*inputs)
        if self.unknown:
            ops = sorted({op for op, _ in self.unknown})
            where = ", ".join(f"{op} (node {node})" for op, node in self.unknown[:12])
            warnings.warn(
                f"invariance_compiler: no symmetry rule for {len(ops)} op(s): {', '.join(ops)}; "
                f"pinned where used: {where}. If an op is positively homogeneous of degree 1 and "
                f"elementwise, register it: ic.register_rule(torch.ops.<ns>.<op>, "
                f"ic.rules.passthrough); to silence this for an op that breaks scaling: "
                f"ic.register_rule(torch.ops.<ns>.<op>, ic.rules.pin).",
                SymmetryWarning, stacklevel=3)
        return self.ctx


def _op_name(n: torch.fx.Node) -> str:
    t = n.target
    if isinstance(t, torch._ops.OpOverload):
        return f"{t.namespace}.{t._schema.name.split('::')[-1]}.{t._overloadname}"
    return getattr(t, "__name__", str(t))
