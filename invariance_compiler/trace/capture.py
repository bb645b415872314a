"""torch.export front end (DESIGN §3.2): the model's forward as a graph of ATen ops.

`torch.export.export(model, args, kwargs, strict=False)` captures what people write (`**kwargs`
forwards, shape-dependent Python, Hugging Face cache objects) as one flat fx graph: every module
inlined, parameters and buffers as placeholders named by the graph signature, `nn_module_stack` in
each node's meta. Control flow is specialised to the example's shapes; data-dependent control flow
fails, and the error names the source line and the ways out.

In-place ops stay in the graph (`aten.relu_`), and later uses read the in-place node. When a mutation
goes through an alias (an in-place op on a view, or on a tensor that a view shares), the graph is
functionalized (`run_decompositions({})`) so that every value the analysis sees is exact."""
from __future__ import annotations

import contextlib
import inspect
import re
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.fx
import torch.nn as nn
from torch.export.graph_signature import InputKind

__all__ = ["Captured", "capture", "capture_kwargs", "TraceFailure", "example_inputs_for", "example_call",
           "preserved"]


class TraceFailure(RuntimeError):
    """The model could not be captured by torch.export; the message names the source line and fixes."""


@dataclass
class Captured:
    """The exported graph and what its placeholders are."""
    gm: torch.fx.GraphModule
    params: dict[str, str]                 # placeholder name -> parameter name (model.named_parameters)
    buffers: dict[str, str]                # placeholder name -> buffer name
    constants: dict[str, Any]              # placeholder name -> lifted constant tensor
    user_inputs: list[str]                 # placeholder names of the flattened user inputs
    signature: Any = None                  # torch.export's ExportGraphSignature
    functionalized: bool = False

    def fixed_nodes(self) -> set:
        """Nodes whose value is the same at every call: computed by deterministic ops from lifted
        constants and buffers that nothing mutates (position ids, masks of a fixed size), never
        from a user input or a parameter."""
        mutated = {mutated_arg(n) for n in self.gm.graph.nodes if n.op == "call_function"}
        out_kind = torch.export.graph_signature.OutputKind.BUFFER_MUTATION
        specs = self.signature.output_specs if self.signature else []
        mutated_buffers = {s.target for s in specs if s.kind == out_kind}
        fixed = set()
        for n in self.gm.graph.nodes:
            if n.op == "placeholder":
                if n.name in self.constants or (n.name in self.buffers and n not in mutated
                                                 and self.buffers[n.name] not in mutated_buffers):
                    fixed.add(n)
            elif n.op == "call_function" and n not in mutated and all(a in fixed for a in n.all_input_nodes):
                tags = getattr(n.target, "tags", ())
                if torch.Tag.nondeterministic_seeded not in tags and mutated_arg(n) is None:
                    fixed.add(n)
        return fixed

    def flat_inputs(self, model: nn.Module, args: tuple, kwargs: dict) -> list:
        """The graph's placeholder values in order: parameters, buffers (copies, so that running
        the graph leaves the model's own untouched), constants, the flattened user inputs."""
        leaves = iter(torch.utils._pytree.tree_leaves((tuple(args), dict(kwargs or {}))))
        params = dict(model.named_parameters(remove_duplicate=False))
        buffers = dict(model.named_buffers(remove_duplicate=False))
        out = []
        for spec in self.signature.input_specs:
            kind = spec.kind
            if kind == InputKind.PARAMETER:
                out.append(params[spec.target] if spec.target in params else model.get_parameter(spec.target))
            elif kind == InputKind.BUFFER:
                b = buffers[spec.target] if spec.target in buffers else model.get_buffer(spec.target)
                out.append(b.clone())
            elif kind in (InputKind.CONSTANT_TENSOR, InputKind.CUSTOM_OBJ):
                out.append(self.constants[spec.arg.name])
            else:
                out.append(next(leaves))
        return out

    def layer_of(self, node: torch.fx.Node) -> str:
        """The innermost module path a node was called from ('' for the root)."""
        stack = node.meta.get("nn_module_stack")
        if not stack:
            return ""
        path = list(stack.values())[-1][0]
        return _clean_path(path)


def _clean_path(path: str) -> str:
    # nn_module_stack paths look like "L['self'].layers[0].conv" in some versions, "layers.0.conv" in others
    path = re.sub(r"^L\['self'\]\.?", "", path)
    return re.sub(r"\[(\d+)\]", r".\1", path).strip(".")


_VIEW_OPS = {"view", "_unsafe_view", "reshape", "slice", "select", "transpose", "permute", "expand",
             "unsqueeze", "squeeze", "t", "alias", "as_strided", "diagonal", "unfold", "split",
             "split_with_sizes", "chunk", "unbind", "narrow", "numpy_T", "view_as", "expand_as",
             "flatten", "unflatten", "movedim", "swapaxes", "detach", "T", "mT", "tensor_split"}


def _is_view(node) -> bool:
    if not isinstance(node, torch.fx.Node) or node.op != "call_function":
        return False
    if node.target is __import__("operator").getitem:
        return _is_view(node.args[0])
    packet = getattr(node.target, "overloadpacket", None)
    return packet is not None and packet.__name__ in _VIEW_OPS


def mutated_arg(node: torch.fx.Node) -> Optional[torch.fx.Node]:
    schema = getattr(node.target, "_schema", None)
    if schema is None:
        return None
    for i, arg in enumerate(schema.arguments):
        if arg.alias_info is not None and arg.alias_info.is_write:
            a = node.args[i] if i < len(node.args) else node.kwargs.get(arg.name)
            if isinstance(a, torch.fx.Node):
                return a
    return None


def _needs_functionalization(gm: torch.fx.GraphModule, buffers: set) -> bool:
    """An in-place op is exact in the training IR when later uses read its result; it is not when
    the mutated tensor is a view, has views, or is read again through its old node."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for n in gm.graph.nodes:
        if n.op != "call_function":
            continue
        a = mutated_arg(n)
        if a is None or a.name in buffers:
            continue
        if _is_view(a) or any(_is_view(u) for u in a.users if u is not n):
            return True
        if any(order[u] > order[n] for u in a.users if u is not n):
            return True
    return False


def capture_kwargs(model: nn.Module, kwargs: Optional[dict]) -> dict:
    """The keyword arguments the capture runs with: the user's, plus use_cache=False when the
    forward takes `use_cache` and the user did not set it. Causal LMs default to returning a cache
    object that torch.export cannot output; the cache holds keys and values, not a function of the
    model's that a loss reads, so the analysis is of the outputs without it. The compiled module
    runs the model's own forward, so at run time the cache comes back exactly as the model's."""
    kwargs = dict(kwargs or {})
    if "use_cache" not in kwargs:
        try:
            params = inspect.signature(model.forward).parameters
        except (TypeError, ValueError):
            params = {}
        if "use_cache" in params:
            kwargs["use_cache"] = False
    return kwargs


def capture(model: nn.Module, args: tuple, kwargs: Optional[dict] = None) -> Captured:
    if not isinstance(model, nn.Module):
        raise TypeError(f"invariance_compiler works on torch.nn.Module instances, got {type(model).__name__}")
    kwargs = dict(kwargs or {})
    try:
        ep = torch.export.export(model, tuple(args), kwargs, strict=False)
    except Exception as err:   # export raises many types (guards, unsupported ops, user errors)
        raise TraceFailure(_explain(model, err)) from err
    sig = ep.graph_signature
    buffers = set(sig.inputs_to_buffers)
    functionalized = _needs_functionalization(ep.graph_module, buffers)
    if functionalized:
        ep = ep.run_decompositions({})
        sig = ep.graph_signature
    names = {id(p): n for n, p in model.named_parameters()}
    params = {}
    for ph, target in sig.inputs_to_parameters.items():
        params[ph] = names.get(id(ep.state_dict[target]), target) if target in ep.state_dict else target
    constants = {s.arg.name: ep.constants[s.target] for s in sig.input_specs
                 if s.kind in (InputKind.CONSTANT_TENSOR, InputKind.CUSTOM_OBJ)}
    user = [s.arg.name for s in sig.input_specs if s.kind == InputKind.USER_INPUT]
    return Captured(ep.graph_module, params, dict(sig.inputs_to_buffers), constants, user, sig,
                    functionalized)


def _explain(model: nn.Module, err: Exception) -> str:
    text = str(err)
    where = ""
    m = re.search(r'File "([^"]+)", line (\d+), in (\w+)\n\s*(.*)', text.split("The following call raised this error:")[-1])
    if m:
        where = f" at {m.group(1)}:{m.group(2)} in {m.group(3)}: `{m.group(4).strip()}`"
    first = next((line for line in text.splitlines() if line.strip()), type(err).__name__)
    data_dependent = "data-dependent" in text or "GuardOnDataDependent" in type(err).__name__
    why = ("control flow depends on tensor values" if data_dependent else first.strip()[:300])
    return (f"could not capture {type(model).__name__} with torch.export{where}: {why} "
            f"({type(err).__name__}).\nWays out: (1) make the branch depend on shapes or Python "
            f"arguments (pass them in example_kwargs), not on tensor values; (2) move the "
            f"data-dependent part out of forward, or wrap it in a custom op (torch.library.custom_op) "
            f"and give that op a rule: ic.register_rule(torch.ops.mylib.op.default, ic.rules.pin); "
            f"(3) pass the Python arguments that choose the path you train (e.g. return_dict).")


def example_inputs_for(model: nn.Module) -> tuple:
    """Inputs for a model whose input shape follows from its first layer (an nn.Linear)."""
    first = next((m for m in model.modules() if next(m.parameters(recurse=False), None) is not None), None)
    params = list(model.parameters())
    dtype = next((p.dtype for p in params if p.is_floating_point()), torch.get_default_dtype())
    if isinstance(first, nn.Linear):
        return (torch.randn(2, first.in_features, dtype=dtype),)
    what = type(first).__name__ if first is not None else "no layer"
    raise ValueError(
        f"cannot infer the input shape of {type(model).__name__}: only a model whose first layer is "
        f"an nn.Linear fixes it, and this one starts with {what}. Pass example inputs, e.g. "
        f"ic.analyze(model, example_inputs=(torch.randn(2, 3, 32, 32),)).")


def example_call(model: nn.Module, example_inputs: Any = None, example_kwargs: Optional[dict] = None
                 ) -> tuple[tuple, dict]:
    """(args, kwargs) for one call of the model, as the public entry points take them: a tensor or
    a tuple of positional arguments (inferred from a first nn.Linear when neither is given), and
    keyword arguments with use_cache=False where the forward takes it (capture_kwargs)."""
    if example_inputs is None and not example_kwargs:
        example_inputs = example_inputs_for(model)
    args = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs or ())
    return args, capture_kwargs(model, example_kwargs)


@contextlib.contextmanager
def preserved(model: nn.Module):
    """Run a block that calls the model (a capture, a check) and leave its buffers (BatchNorm's
    running statistics) and the global RNG as they were."""
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    rng = torch.random.get_rng_state()
    try:
        yield
    finally:
        with torch.no_grad():
            for n, b in model.named_buffers():
                b.copy_(buffers[n])
        torch.random.set_rng_state(rng)
