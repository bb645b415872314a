"""compile_invariant and the module it returns."""
from __future__ import annotations

import copy
from typing import Any, Optional

import torch
import torch.fx
import torch.nn as nn

from ..analyze import analyze
from ..skeleton import build_skeleton, fix_to
from .allocate import make_allocation, reference
from .emit import attr_name, fetch, guard_reshapes, rewrite

__all__ = ["compile_invariant", "InvariantModule"]


class InvariantModule(torch.fx.GraphModule):
    """A GraphModule whose parameters are path values (form="gspace") or the free entries of the
    weights (form="fixed"); its graph computes every original weight from them."""

    form: str
    report: Any
    skeleton: Any

    def num_free_parameters(self) -> int:
        """m - H: the entries that are not fixed."""
        return self.report.num_params - sum(p.fixed_idx.numel() for p in self.skeleton.params.values())

    @torch.no_grad()
    def weights(self) -> dict[str, torch.Tensor]:
        """The original model's parameters, as this module computes them."""
        vs = [getattr(self, self._v_attr[n]) for n in self._allocated]
        carriers = getattr(self, "v_carriers", None)
        ws = dict(zip(self._allocated, reference(self.allocate, carriers, vs))) if self._allocated else {}
        for name, attr in self._v_attr.items():
            ws.setdefault(name, getattr(self, attr))
        for name, value in self._unused.items():
            ws[name] = value
        return {n: ws[n].detach().clone() for n in self.report.param_names}

    @torch.no_grad()
    def path_values(self) -> dict[str, torch.Tensor]:
        """G-space coordinates in weight shape: V with the carrier slots filled from v_carriers
        and the fixed slots zero (a scaled Linear keeps derived values there)."""
        out = {}
        for name, attr in self._v_attr.items():
            v = getattr(self, attr).detach().clone()
            if name in self._allocated and self.form == "gspace":
                i = self._allocated.index(name)
                v.view(-1)[self.allocate.buf("fixed_idx", i)] = 0
                v.view(-1)[self.allocate.buf("carrier_idx", i)] = \
                    self.v_carriers[self.allocate.buf("carrier_cls", i)]
            out[name] = v
        return out

    def export_state_dict(self) -> dict[str, torch.Tensor]:
        """The original model's state_dict keys with plain weights: load it into the original class
        to get this module's function."""
        out = dict(self.weights())
        for key, buf in self._orig_buffers().items():
            out[key] = buf.detach().clone()
        return {k: out[k] for k in self._state_keys}

    def _orig_buffers(self):
        out = {}
        for key in self._state_keys:
            if key in self.report.param_names:
                continue
            mod_path, _, leaf = key.rpartition(".")
            try:
                mod = self.get_submodule(mod_path) if mod_path else self
                out[key] = getattr(mod, leaf)
            except AttributeError:
                out[key] = self._extra_buffers[key]
        return out

    # The skeleton and the values export needs travel in state_dict (as tensors, so that
    # torch.load(weights_only=True) reads them): a module compiled from other weights, whose
    # skeleton differs, then loads a checkpoint and becomes the saved module (its plan buffers,
    # resized by Allocation, come with the same state_dict).
    def get_extra_state(self):
        return {"skeleton": self.skeleton.state(), "unused": dict(self._unused),
                "extra_buffers": dict(self._extra_buffers)}

    def set_extra_state(self, state) -> None:
        from ..skeleton import Skeleton
        self.skeleton = Skeleton.from_state(self.report, state["skeleton"])
        self._unused = {k: v.clone() for k, v in state["unused"].items()}
        self._extra_buffers = {k: v.clone() for k, v in state["extra_buffers"].items()}

    _EXTRAS = ("form", "report", "skeleton", "_v_attr", "_allocated", "_unused", "_state_keys",
               "_extra_buffers")

    def __reduce__(self):
        # GraphModule pickles its code and re-traces it on load, which cannot go through
        # functional_call; we pickle the module state and the node list instead.
        state = {k: v for k, v in self.__dict__.items() if k not in ("_graph", "_code")}
        return (_rebuild, (state, _nodes_of(self.graph)))

    def __deepcopy__(self, memo):
        res = torch.fx.GraphModule.__deepcopy__(self, memo)
        for k in self._EXTRAS:
            res.__dict__[k] = copy.deepcopy(self.__dict__[k], memo)
        return res


class _Ref(str):
    """A node argument, by name, in a pickled node list."""


def _nodes_of(graph: torch.fx.Graph) -> list:
    return [(n.op, n.target, torch.fx.map_arg(n.args, lambda a: _Ref(a.name)),
             torch.fx.map_arg(n.kwargs, lambda a: _Ref(a.name)), n.name) for n in graph.nodes]


def _rebuild(state: dict, nodes: list) -> InvariantModule:
    from torch.fx.node import map_aggregate
    graph, env = torch.fx.Graph(), {}
    for op, target, args, kwargs, name in nodes:
        fix = lambda a: env[a] if isinstance(a, _Ref) else a
        env[name] = graph.create_node(op, target, map_aggregate(args, fix), map_aggregate(kwargs, fix), name)
    obj = InvariantModule.__new__(InvariantModule)
    obj.__dict__.update(state)
    obj.graph = graph                                 # recompiles forward
    return obj


def compile_invariant(model: nn.Module, example_inputs: Any = None, form: str = "gspace",
                      fixed: str = "keep", value: float = 1.0, *, skeleton=None,
                      scale_activations: bool = True,
                      concrete_args: Optional[dict[str, Any]] = None) -> InvariantModule:
    """Compile `model` into a module with the same function whose parameters have no rescaling
    redundancy left.

    form:  "gspace" (parameters are basis-path values V; WA forward, ICR backward) or "fixed"
           (free entries are parameters, one fixed entry per generator is a buffer).
    fixed: "keep" the fixed entries' current values (function unchanged); "scale" them to |w| =
           value by a group action (function unchanged); "overwrite" them with value (changes the
           function: G-SGD's skeleton initialisation, for fresh models).
    skeleton: reuse the skeleton of another compiled module of the same architecture
           (`other.skeleton`), so that both have the same coordinates.
    scale_activations: (gspace) Linear layers scale their input and output activations instead
           of forming W (cheaper at moderate batch); False allocates every weight."""
    if form not in ("gspace", "fixed"):
        raise ValueError(f"compile_invariant: form must be 'gspace' or 'fixed', got {form!r}")
    if fixed not in ("keep", "scale", "overwrite"):
        raise ValueError(f"compile_invariant: fixed must be 'keep', 'scale' or 'overwrite', got {fixed!r}")
    report = analyze(model, example_inputs, concrete_args=concrete_args)
    gm = copy.deepcopy(report.graph)
    guard_reshapes(gm)                              # inputs of another shape must not pass silently
    for node in gm.graph.nodes:                     # analysis values are not part of the program
        node.meta.pop("ic_value", None)
    # deepcopy keeps sharing: map each copied parameter back to the model's canonical name
    orig = dict(model.named_parameters())
    copied = dict(gm.named_parameters(remove_duplicate=False))
    by_value = {id(orig[n]): n for n in orig}
    canonical = {}
    for path, p in copied.items():
        src = fetch(model, path)
        canonical[id(p)] = by_value[id(src)]

    weights = {n: p.detach().cpu().clone() for n, p in orig.items()}   # plans are built on CPU
    _check_finite(weights, "compile_invariant")
    sk = skeleton if skeleton is not None else build_skeleton(report, weights, carriers=(form == "gspace"))
    if fixed == "scale":
        work = copy.deepcopy(model).cpu()
        fix_to(report, sk, work, value)
        weights = {n: p.detach().clone() for n, p in work.named_parameters()}
    elif fixed == "overwrite":
        for name, ps in sk.params.items():
            if ps.fixed_idx.numel() and not report.is_inert(name):
                weights[name].reshape(-1)[ps.fixed_idx] = value

    dtype = _float_dtype(orig.values())
    used = {canonical[id(p)] for p in copied.values()}
    names = [n for n in report.param_names if n in used]
    unused = {n: weights[n] for n in report.param_names if n not in used}   # inert; kept for export
    linear = _single_use_linears(gm, canonical) if scale_activations else {}
    gm.allocate, init, allocated, carriers = make_allocation(report, sk, weights, form, names, dtype, linear)
    if carriers is not None and allocated:
        gm.register_parameter("v_carriers", nn.Parameter(carriers))
    taken = set(dict(gm.named_children())) | set(dict(gm.named_buffers())) | {"v_carriers"}
    v_attr = {}
    for name in names:
        v_attr[name] = attr_name("v_" if form == "gspace" else "free_", name, taken)
        gm.register_parameter(v_attr[name], nn.Parameter(init[name], requires_grad=orig[name].requires_grad))
    graph = rewrite(gm, canonical, allocated, gm.allocate.wa, linear, v_attr, form)
    # the modules keep their code and buffers; their parameters now come from the allocation
    for mod in gm.modules():
        if mod is not gm:
            for k in list(mod._parameters):
                mod.register_parameter(k, None)
    cm = InvariantModule(gm, graph, f"Invariant{type(model).__name__}")
    lean = copy.copy(report)
    lean.graph = None                                # cm.graph carries the node meta
    cm.form, cm.report, cm.skeleton = form, lean, sk
    cm._v_attr, cm._allocated, cm._unused = v_attr, allocated, unused
    cm._state_keys = list(model.state_dict().keys())
    cm._extra_buffers = {k: b.detach().clone() for k, b in model.state_dict().items()
                         if k not in orig and not _has(cm, k)}
    cm.train(model.training)
    return cm.to(next(iter(orig.values())).device) if orig else cm


def _single_use_linears(gm: torch.fx.GraphModule, canonical: dict) -> dict:
    """{weight: bias or None} of nn.Linear modules called once, whose parameters have no other use."""
    uses: dict[str, int] = {}
    linear = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            mod = gm.get_submodule(node.target)
            for p in mod.parameters(recurse=False):
                uses[canonical[id(p)]] = uses.get(canonical[id(p)], 0) + 1
            if type(mod) is nn.Linear and not node.kwargs and len(node.args) == 1:
                bias = canonical[id(mod.bias)] if mod.bias is not None else None
                linear[canonical[id(mod.weight)]] = bias
        elif node.op == "get_attr" and id(fetch(gm, node.target)) in canonical:
            name = canonical[id(fetch(gm, node.target))]
            uses[name] = uses.get(name, 0) + 1
    return {w: b for w, b in linear.items() if uses.get(w) == 1 and (b is None or uses.get(b) == 1)}


def _float_dtype(params) -> torch.dtype:
    """The dtype of the allocation: that of the first floating-point parameter (integer ones are
    constants the analysis pins)."""
    return next((p.dtype for p in params if p.is_floating_point()), torch.get_default_dtype())


def _check_finite(weights: dict, who: str) -> None:
    for name, w in weights.items():
        if w.is_floating_point() and not bool(torch.isfinite(w).all()):
            bad = (~torch.isfinite(w)).nonzero()
            raise ValueError(f"{who}: parameter '{name}' has {bad.shape[0]} non-finite entries (first at "
                             f"index {tuple(bad[0].tolist())}: {w[tuple(bad[0])].item()}); the skeleton divides "
                             f"by weights and would spread them. Repair or re-initialise it first.")


def _has(root, path):
    try:
        fetch(root, path)
        return True
    except AttributeError:
        return False
