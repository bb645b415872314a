"""compile_invariant and the module it returns (DESIGN §4b).

The compiled module is the original model with other coordinates, nothing else: it keeps a copy of
the model (its buffers, submodules, hooks, train/eval behaviour) without its parameters, and each
forward computes every weight from the new parameters (WA; ICR in backward) and runs the model's
own forward on them through torch.func.functional_call. So in-place ops, dropout, BatchNorm's
running statistics and every module subclass behave exactly as in the original.

Linear layers and convolutions whose weight has no other use can scale their activations instead
of forming W (x @ (V ⊘ (M ⊗ P_in))ᵀ = ((x ⊘ P_in) @ Vᵀ) ⊘ M, per channel for a convolution): such an
nn.Linear (nn.ConvNd) in the copy becomes a `ScaledLinear` (`ScaledConvNd`), which reads V where the
weight would be, or W where an eager call forms it (Allocation.formed_now)."""
from __future__ import annotations

import copy
import functools
import re
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..analyze import analyze
from ..skeleton import build_skeleton, check_finite, fix_to, typical_scales
from .allocate import allocation_dtype, make_allocation, reference
from .forms import FORMS, ZeroHeld, fill, form_of, keep_held
from .model_api import ModelAPI, SignedForward

__all__ = ["compile_invariant", "CompiledState", "InvariantModule", "ScaledLinear", "ScaledConv1d",
           "ScaledConv2d", "ScaledConv3d"]


# What a fast layer reads for its scales in an eager forward that formed its W and b by WA
# (Allocation.formed_now): the layer then runs as the original does. Its dtype tells the two apart, which
# a compiled graph reads without a guard on data.
FORMED = torch.zeros(0, dtype=torch.bool)


class ScaledLinear(nn.Linear):
    """An nn.Linear of the compiled module's copy whose weight and bias are coordinates V. The
    plan and this layer's place in it are fixed when it is compiled (`_ic_plan`, `_ic_index`); the
    numbers it reads from the current carriers arrive like its weight does, through the compiled
    module's functional_call: the buffer `ic_scales` (Allocation.linear_scales), a placeholder
    outside a call. An eager forward that formed this layer's W (Allocation.formed_now) hands it
    W and b instead, with `ic_scales` = FORMED."""

    def forward(self, x):
        scales = self.ic_scales
        if scales.dtype == torch.bool:         # FORMED: this forward gave it W and b (WA)
            return F.linear(x, self.weight, self.bias)
        _check_called_inside(self)
        return self._ic_plan.linear(x, self.weight, self.bias, scales, self._ic_index)


class _ScaledConv:
    """ScaledLinear's counterpart for an nn.Conv1d/2d/3d (groups 1, zero padding): x scaled per
    input channel, the output per output channel (Allocation.conv)."""

    def forward(self, x):
        scales = self.ic_scales
        if scales.dtype == torch.bool:         # FORMED: this forward gave it W and b (WA)
            return self._conv_forward(x, self.weight, self.bias)
        _check_called_inside(self)
        return self._ic_plan.conv(x, self.weight, self.bias, scales, self._ic_index, self)


class ScaledConv1d(_ScaledConv, nn.Conv1d):
    pass


class ScaledConv2d(_ScaledConv, nn.Conv2d):
    pass


class ScaledConv3d(_ScaledConv, nn.Conv3d):
    pass


class _ScaledAddmm:
    """ScaledLinear's counterpart for transformers' Conv1D (GPT-2's projections: W stored (in, out),
    y = addmm(b, x, W)); a subclass of that class, made on first use (`_scaled_class`)."""

    def forward(self, x):
        size_out = x.size()[:-1] + (self.nf,)
        x = x.view(-1, x.size(-1))
        scales = self.ic_scales
        if scales.dtype == torch.bool:         # FORMED: this forward gave it W and b (WA)
            return torch.addmm(self.bias, x, self.weight).view(size_out)
        _check_called_inside(self)
        return self._ic_plan.linear(x, self.weight, self.bias, scales, self._ic_index).view(size_out)


_SCALED = {nn.Linear: ScaledLinear, nn.Conv1d: ScaledConv1d, nn.Conv2d: ScaledConv2d, nn.Conv3d: ScaledConv3d}


def _scaled_class(kind: type) -> type:
    if kind not in _SCALED:                     # transformers' Conv1D: its class is not ours to import
        name = f"Scaled{kind.__name__}"
        _SCALED[kind] = type(name, (_ScaledAddmm, kind), {"__module__": __name__, "__qualname__": name})
    return _SCALED[kind]


def __getattr__(name: str):
    """ScaledConv1D, made on first use, for unpickling a compiled GPT-2 in a new process."""
    if name == "ScaledConv1D":
        from transformers.pytorch_utils import Conv1D
        return _scaled_class(Conv1D)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
_CONV_OPS = {nn.Conv1d: torch.ops.aten.conv1d, nn.Conv2d: torch.ops.aten.conv2d, nn.Conv3d: torch.ops.aten.conv3d}


def _adopt(module: nn.Module, plan, index: int) -> None:
    """Turn the copy's nn.Linear or nn.ConvNd `module` into fast layer `index` of `plan`."""
    module.__class__ = _scaled_class(type(module))
    module.__dict__["_ic_plan"], module.__dict__["_ic_index"] = plan, index   # not a submodule
    module.register_buffer("ic_scales", torch.full((), float("nan")), persistent=False)


def _check_called_inside(layer: nn.Module) -> None:
    if layer.ic_scales.dim() == 0 and layer._ic_plan.form == "gspace":
        raise RuntimeError(f"{type(layer).__name__} is part of a compiled module: call the InvariantModule, "
                           "not its inner model")


@dataclass
class CompiledState:
    """What compile_invariant derives, as InvariantModule's constructor takes it."""
    form: str                        # "gspace" | "fixed"
    report: Any                      # the SymmetryReport
    skeleton: Any                    # the Skeleton
    plan: Any                        # the Allocation
    init: dict                       # original parameter name -> its initial coordinates
    allocated: list                  # the names the plan allocates, in plan order
    carriers: Optional[torch.Tensor]  # the carriers' path values (gspace)
    requires_grad: dict              # original parameter name -> requires_grad
    unused: dict                     # parameters the forward never reads, kept as they are
    aliases: dict                    # every parameter name of the model -> canonical name
    fast: dict                       # Linear module path -> (weight, bias or None): scaled activations
    guard: Optional[dict]            # example shapes, when a reshape depends on them
    state_keys: list                 # the original model's state_dict keys
    code: tuple                      # (the captured forward's code, its placeholders -> parameters)
    example_size: int = 0            # entries of the example's tensors (Allocation.formed_now)


class InvariantModule(ModelAPI, nn.Module):
    """The compiled model. Parameters: invariant coordinates V (form="gspace", one `v_<name>` per
    weight, and `v_carriers` with raw path values) or the free entries of the weights
    (form="fixed", `free_<name>`); `allocate` is the allocation plan; `model` the original model
    without its parameters."""

    def __init__(self, model: nn.Module, state: "CompiledState"):
        super().__init__()
        self._state_keys = list(state.state_keys)         # the original model's state_dict keys
        self._code, self._placeholders = state.code       # the captured forward, for `code`
        self.model = model
        self.allocate = state.plan
        self.form, self.report, self.skeleton = state.form, state.report, state.skeleton
        self._allocated = list(state.allocated)
        self._aliases = dict(state.aliases)               # every parameter name of the model -> canonical
        self._fast = dict(state.fast)                     # module path -> (weight name, bias name or None)
        # functional_call's input name of each fast layer's scales -> its index in plan.fast
        self._fast_keys = {f"{path}.ic_scales": model.get_submodule(path)._ic_index for path in self._fast}
        self._guard = state.guard                         # example shapes, when a reshape depends on them
        self._example_size = state.example_size
        self._unused = {k: v.clone() for k, v in state.unused.items()}
        if state.carriers is not None and state.carriers.numel() and self._allocated:
            # (raw path values only: scaled coordinates keep the carriers' entries in V)
            self.v_carriers = nn.Parameter(state.carriers)
        self._v_attr: dict[str, str] = {}
        taken = {"model", "allocate", "v_carriers"}
        for name, v in state.init.items():
            attr = attr_name(FORMS[self.form].prefix, name, taken)
            self._v_attr[name] = attr
            self.register_parameter(attr, nn.Parameter(v, requires_grad=state.requires_grad[name]))
        self.forward = SignedForward(self)                  # Trainer reads the model's signature
        self._hold_hooks()
        self.register_load_state_dict_post_hook(_hold_after_load)

    def _hold_hooks(self) -> None:
        """Now, and again when unpickled or deep-copied (hooks are not kept), so that a compiled
        forward, which cannot attach them, finds them: every parameter's held slots are written
        now and after each optimizer step (forms.keep_held), and after a checkpoint is loaded
        (which may predate this); in the fixed form, each parameter with fixed entries also gets
        the hook that zeroes their gradient (forms.ZeroHeld)."""
        plan = self.allocate
        for i, (name, t) in enumerate(zip(self._allocated, plan.tensors)):
            p = getattr(self, self._v_attr[name])
            keep_held(p, functools.partial(plan.held_slots, i))
            held = plan.held_slots(i)
            if held is not None:
                fill(p, *held, held=True)
            if not FORMS[self.form].carriers and t.fixed_idx.numel() and p.requires_grad:
                ZeroHeld.attach(p, t)

    def __setstate__(self, state):
        super().__setstate__(state)
        if "_v_attr" in self.__dict__:
            self._hold_hooks()
            if _hold_after_load not in self._load_state_dict_post_hooks.values():   # pickled before it
                self.register_load_state_dict_post_hook(_hold_after_load)

    # ---- forward ------------------------------------------------------------------------------
    def _carriers(self) -> Optional[torch.Tensor]:
        """The carrier parameter (raw path values, or a plan saved with carriers of its own); with
        scaled coordinates, which keep the carriers' entries in V, an empty vector."""
        trained = self._parameters.get("v_carriers")
        if trained is None and FORMS[self.form].carriers:
            return self.allocate.path_scale[:0]
        return trained

    def _weights(self, size: float = 1.0) -> dict[str, torch.Tensor]:
        """The tensors the model's forward reads for its parameters (the fast layers get V, or W
        where an eager call of `size` times the example's input forms it)."""
        plan = self.allocate
        trained = self._carriers()
        formed = plan.formed_now(torch.compiler.is_compiling(), size)
        index = plan.wa_index(formed)
        scaled = len(self._fast) > len(formed) and FORMS[self.form].carriers
        carriers = plan.carrier_values(trained)
        p_in = FORMS[self.form].path_in(plan, carriers)
        vs = {n: getattr(self, a) for n, a in self._v_attr.items()}
        for i in (i for k in formed for i in plan.fast[k] if i >= 0):
            # WA, which forms these, reads none of their held slots: write them back for the
            # compiled calls, which read them where they are (forms.fill)
            held = plan.held_slots(i)
            if held is not None:
                fill(vs[self._allocated[i]], *held, held=True)
        ws = dict(vs)
        if index:
            allocated = plan(p_in, carriers, *[vs[self._allocated[i]] for i in index], index=index)
            ws.update({self._allocated[i]: w for i, w in zip(index, allocated)})
        ws.update(self._unused)
        if torch.compiler.is_compiling():
            # functional_call puts an nn.Parameter into the copy's _parameters and takes it out
            # again within the frame, which dynamo's guards on that dict reject: hand it views
            ws = {n: t.view_as(t) if isinstance(t, nn.Parameter) else t for n, t in ws.items()}
        out = {alias: ws[name] for alias, name in self._aliases.items()}
        if self._fast and FORMS[self.form].carriers:   # what the fast layers read besides V, as
            scales = plan.linear_scales(p_in, carriers) if scaled else None   # functional_call's inputs
            out.update({key: FORMED if k in formed else scales[k] for key, k in self._fast_keys.items()})
        return out

    def forward(self, *args, **kwargs):
        if self._guard is not None:
            _check_shapes(self._guard, args, kwargs)
        size = 1.0
        if self.__dict__.get("_example_size") and not torch.compiler.is_compiling():
            size = _input_size(args, kwargs) / self._example_size
        return torch.func.functional_call(self.model, self._weights(size), args, kwargs, tie_weights=False,
                                          strict=False)

    # ---- the contract -------------------------------------------------------------------------
    @property
    def allocated(self) -> list[str]:
        """The original parameters whose weights the allocation computes, in plan order."""
        return list(self._allocated)

    def parameter_of(self, name: str) -> nn.Parameter:
        """The parameter holding the coordinates of the original parameter `name` (its path
        values V in gspace form, its free entries in fixed form)."""
        return getattr(self, self._v_attr[name])

    def parameter_names(self) -> dict[str, str]:
        """{original parameter name: name of the parameter holding its coordinates}."""
        return dict(self._v_attr)

    def num_free_parameters(self) -> int:
        """The entries that are not held constant: m - H when every generator is quotiented
        (plain classes, relation generators, inert entries; DESIGN §3.6c)."""
        return self.report.num_params - self.skeleton.num_fixed

    @torch.no_grad()
    def weights(self) -> dict[str, torch.Tensor]:
        """The original model's parameters, as this module computes them."""
        vs = [getattr(self, self._v_attr[n]) for n in self._allocated]
        carriers = self.allocate.carrier_values(self._carriers())
        ws = dict(zip(self._allocated, reference(self.allocate, carriers, vs))) if self._allocated else {}
        for name, attr in self._v_attr.items():
            ws.setdefault(name, getattr(self, attr))
        ws.update(self._unused)
        return {n: ws[n].detach().clone() for n in self.report.param_names}

    @torch.no_grad()
    def path_values(self) -> dict[str, torch.Tensor]:
        """G-space coordinates in weight shape: V with the carrier slots filled from v_carriers
        and the fixed slots zero (a scaled Linear keeps derived values there)."""
        out = {}
        for name, attr in self._v_attr.items():
            v = getattr(self, attr).detach().clone()
            if name in self._allocated:
                v = FORMS[self.form].path_values(v, self.allocate, self._allocated.index(name),
                                                 self.allocate.carrier_values(self._carriers()))
            out[name] = v
        return out

    def export_state_dict(self) -> dict[str, torch.Tensor]:
        """The original model's state_dict keys with plain weights: load it into the original class
        to get this module's function."""
        out = dict(self.weights())
        for key, value in self.model.state_dict().items():
            out.setdefault(key, value.detach().clone())
        aliases = {a: out[c] for a, c in self._aliases.items() if c in out}
        out.update(aliases)
        return {k: out[k] for k in self._state_keys}

    @property
    def code(self) -> str:
        """The emitted program: the allocation, then the model's own forward (as torch.export
        captured it) reading the allocated weights."""
        return _program(self)

    def print_readable(self) -> str:
        text = self.code
        print(text)
        return text

    # The skeleton travels in state_dict (as tensors, so that torch.load(weights_only=True) reads
    # it): a module compiled from other weights, whose skeleton differs, then loads a checkpoint and
    # becomes the saved module (its plan buffers, resized by Allocation, come with the same state_dict).
    def get_extra_state(self):
        return {"skeleton": self.skeleton.state(), "unused": dict(self._unused), "format": 2}

    def set_extra_state(self, state) -> None:
        from ..skeleton import Skeleton
        self.skeleton = Skeleton.from_state(self.report, state["skeleton"])
        self._unused = {k: v.clone() for k, v in state.get("unused", {}).items()}

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        # Checkpoints of the fx-graph modules (before DESIGN §4b) kept the model's buffers at the
        # top level ("1.running_mean"); ours live under "model.".
        ours = {prefix + "model." + k for k, _ in self.model.named_buffers()}
        for key in list(state_dict):
            if key.startswith(prefix) and not key.startswith(prefix + "model.") and \
                    prefix + "model." + key[len(prefix):] in ours and key[len(prefix):].split(".")[0] not in (
                        "allocate", "v_carriers", "_extra_state") and key[len(prefix):] not in self._v_attr.values():
                state_dict[prefix + "model." + key[len(prefix):]] = state_dict.pop(key)
        # a checkpoint's plan is its chart: with carriers of their own (raw path values, or scaled
        # coordinates saved before P_in was held) or without (their entries in V): adopt it
        carriers = state_dict.get(prefix + "v_carriers")
        mine = self._parameters.get("v_carriers")
        if isinstance(carriers, torch.Tensor) and (mine is None or carriers.shape != mine.shape) and \
                FORMS[self.form].carriers:
            # first, where a module compiled with carriers has them (an optimizer's state follows
            # the parameters' order)
            rest = [(k, p) for k, p in self._parameters.items() if k != "v_carriers"]
            self._parameters.clear()
            self._parameters["v_carriers"] = nn.Parameter(self.allocate.M.new_empty(carriers.shape))
            self._parameters.update(rest)
        elif carriers is None and mine is not None and prefix + "allocate.M" in state_dict:
            del self.v_carriers
        extra = state_dict.get(prefix + "_extra_state")
        if isinstance(extra, dict) and "extra_buffers" in extra and "format" not in extra:
            extra.pop("extra_buffers")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, errors)


def _hold_after_load(module: InvariantModule, incompatible_keys) -> None:
    module._hold_hooks()


def attr_name(prefix: str, param: str, taken: set) -> str:
    base = prefix + re.sub(r"\W", "_", param)
    name, k = base, 1
    while name in taken:
        name, k = f"{base}_{k}", k + 1
    taken.add(name)
    return name


def _check_shapes(guard, args, kwargs):
    leaves = [t for t in torch.utils._pytree.tree_leaves((tuple(args), dict(kwargs)))
              if isinstance(t, torch.Tensor)]
    for t, shape in zip(leaves, guard["shapes"]):
        if tuple(t.shape[1:]) != shape:
            raise ValueError(
                f"invariance_compiler: node '{guard['node']}' ({guard['op']}) reshapes a tensor whose "
                f"layout follows the example's shape (an input of shape (N, {', '.join(map(str, shape))}) "
                f"when the module was compiled), but got an input of shape {tuple(t.shape)}: which "
                f"entries share a scale follows the example's layout, so the compiled symmetry may not "
                f"hold for this shape. Compile again with an example of the new shape "
                f"(compile_invariant(model, new_example)), or make the shape fixed before the reshape "
                f"(adaptive pooling).")


def compile_invariant(model: nn.Module, example_inputs: Any = None, form: str = "gspace",
                      fixed: str = "keep", value: float = 1.0, *, example_kwargs: Optional[dict] = None,
                      skeleton=None, scale_activations: bool | str = "auto",
                      coordinates: str = "scaled") -> InvariantModule:
    """Compile `model` into a module with the same function whose parameters have no rescaling
    redundancy left.

    form:  "gspace" (parameters are basis-path values V; WA forward, ICR backward) or "fixed"
           (free entries are parameters, one fixed entry per generator is a buffer).
    fixed: "keep" the fixed entries' current values (function unchanged); "scale" them to |w| =
           value by a group action (function unchanged); "overwrite" them with value (changes the
           function: G-SGD's skeleton initialisation, for fresh models).
    skeleton: reuse the skeleton of another compiled module of the same architecture
           (`other.skeleton`), so that both have the same coordinates.
    scale_activations: (gspace) "auto" (default): Linear layers and convolutions (groups 1) scale
           their input and output activations instead of forming W, in an eager call only where
           their weight outweighs their activations at that call's size (the others get W from
           WA there, Linears only where that saves a WA call's cost; Allocation.formed_now), under
           torch.compile all of them; True: every such
           layer, in both; False: every weight is allocated.
    coordinates: (gspace) "scaled" (default): the invariant coordinates of the fixed entries
           alone, in the units of the orbit's typical-scale point (skeleton.typical_scales): each
           is its weight at that point times a constant, so SGD on them is SGD on those weights
           (DESIGN §3.6b; train with this);
           "paths": G-SGD's raw basis-path values (products of weights along paths, ~1e-6 in a
           default-initialised deep model; for G-SGD's own initialisation and the paper's figures)."""
    rules = form_of(form)
    if coordinates not in ("scaled", "paths"):
        raise ValueError(f"compile_invariant: coordinates must be 'scaled' or 'paths', got {coordinates!r}")
    if fixed not in ("keep", "scale", "overwrite"):
        raise ValueError(f"compile_invariant: fixed must be 'keep', 'scale' or 'overwrite', got {fixed!r}")
    if scale_activations not in (True, False, "auto"):
        raise ValueError(f"compile_invariant: scale_activations must be 'auto', True or False, got "
                         f"{scale_activations!r}")
    report = analyze(model, example_inputs, example_kwargs)
    captured = report.captured
    orig = dict(model.named_parameters())
    weights = {n: p.detach().cpu().clone() for n, p in orig.items()}   # plans are built on CPU
    check_finite(weights, "compile_invariant")
    sk = skeleton if skeleton is not None else build_skeleton(report, weights, carriers=rules.carriers)
    if fixed == "scale":
        work = copy.deepcopy(model).cpu()
        fix_to(report, sk, work, value)
        weights = {n: p.detach().clone() for n, p in work.named_parameters()}
    elif fixed == "overwrite":
        for name, ps in sk.params.items():
            if ps.fixed_idx.numel() and not report.is_inert(name):
                keep = set(report.inert_entries(name).tolist())
                idx = [i for i in ps.fixed_idx.tolist() if i not in keep]
                weights[name].reshape(-1)[idx] = value

    dtype = allocation_dtype(orig.values())
    read = report.read
    names = [n for n in report.param_names if n in read]
    unused = {n: weights[n].to(orig[n].device) for n in report.param_names if n not in read}
    inner = copy.deepcopy(model)
    found = _single_use_layers(inner, captured) if (scale_activations and rules.scales_activations) \
        else FastLayers({}, {}, set())
    linear = found.layers
    # "auto": eagerly, a layer whose activations outweigh its weight forms W (WA) instead
    activations = {linear[path][0]: a for path, a in found.activations.items()} \
        if scale_activations == "auto" else None
    units = typical_scales(report, sk, weights) if coordinates == "scaled" and rules.carriers else None
    plan, init, allocated, carriers = make_allocation(
        report, sk, weights, form, names, dtype, {w: b for w, b in linear.values()}, units, activations,
        frozenset(linear[path][0] for path in found.transposed))
    fast = {path: wb for path, wb in linear.items() if wb[0] in allocated and wb[0] not in
            [allocated[i] for i in plan.wa]}
    for path, (w, b) in fast.items():
        ij = (allocated.index(w), allocated.index(b) if b in allocated else -1)
        _adopt(inner.get_submodule(path), plan, plan.fast.index(ij))
    for mod in inner.modules():                  # the copy keeps code and buffers, not parameters
        for k in [k for k, p in mod._parameters.items() if p is not None]:
            del mod._parameters[k]
    canonical = {id(p): n for n, p in model.named_parameters()}        # a tied one: its first name
    aliases = {a: canonical[id(p)] for a, p in model.named_parameters(remove_duplicate=False)}
    cm = InvariantModule(inner, CompiledState(
        form=form, report=report, skeleton=sk, plan=plan, init=init, allocated=allocated, carriers=carriers,
        requires_grad={n: orig[n].requires_grad for n in init}, unused=unused, aliases=aliases, fast=fast,
        guard=_guard(report, captured, example_inputs, example_kwargs), state_keys=list(model.state_dict().keys()),
        code=(captured.gm.code, dict(captured.params)), example_size=_input_size(example_inputs, example_kwargs)))
    cm.train(model.training)
    return cm.to(next(iter(orig.values())).device) if orig else cm


@dataclass
class FastLayers:
    """What `_single_use_layers` finds."""
    layers: dict          # module path -> (weight, bias or None)
    activations: dict     # module path -> input and output entries at the example (None: unknown)
    transposed: set       # paths whose weight is stored (in, out): transformers' Conv1D


def _is_gpt_conv1d(mod: nn.Module) -> bool:
    """transformers' Conv1D (GPT-2's projections): y = addmm(b, x, W), W stored (in, out)."""
    return type(mod).__name__ == "Conv1D" and type(mod).__module__ == "transformers.pytorch_utils" and \
        getattr(mod, "weight", None) is not None and mod.weight.dim() == 2 and getattr(mod, "bias", None) is not None


def _single_use_layers(model: nn.Module, captured) -> FastLayers:
    """Exact nn.Linear modules whose parameters are read by one aten.linear call of that module and
    nothing else, likewise exact nn.Conv1d/2d/3d modules (groups 1, zero padding given as numbers)
    and one call of their convolution, and transformers' Conv1D and one aten.addmm."""
    found = FastLayers({}, {}, set())
    placeholder: dict[str, torch.fx.Node] = {}          # parameter name -> its graph input
    for ph in captured.gm.graph.nodes:
        if ph.op == "placeholder" and ph.name in captured.params:
            placeholder[captured.params[ph.name]] = ph
    readers = {name: list(ph.users) for name, ph in placeholder.items()}
    for path, mod in model.named_modules():
        at = (0, 1, 2)                                # positions of x, W and b in the op's arguments
        if type(mod) is nn.Linear:
            op = torch.ops.aten.linear
        elif type(mod) in _CONV_OPS and mod.groups == 1 and mod.padding_mode == "zeros" and \
                not isinstance(mod.padding, str):
            op = _CONV_OPS[type(mod)]
        elif _is_gpt_conv1d(mod):
            op, at = torch.ops.aten.addmm, (1, 2, 0)
        else:
            continue
        w = f"{path}.weight" if path else "weight"
        b = (f"{path}.bias" if path else "bias") if mod.bias is not None else None
        uses = readers.get(w, [])
        if len(uses) != 1:
            continue
        node = uses[0]
        if getattr(node.target, "overloadpacket", None) is not op or len(node.args) <= at[1] or \
                node.args[at[1]] is not placeholder[w] or \
                captured.layer_of(node) != path or (op is torch.ops.aten.addmm and node.kwargs):
            continue
        if b is not None:
            if readers.get(b, []) != [node] or len(node.args) <= at[2] or node.args[at[2]] is not placeholder[b]:
                continue
        elif len(node.args) > 2 and node.args[2] is not None:
            continue
        found.layers[path] = (w, b)
        found.activations[path] = _entries(node.args[at[0]], node)
        if op is torch.ops.aten.addmm:
            found.transposed.add(path)
    return found


def _entries(x_node, node) -> Optional[int]:
    """The entries of a layer's input and output at the example (None where a size is symbolic)."""
    x, y = x_node.meta.get("val"), node.meta.get("val")
    try:
        return int(x.numel()) + int(y.numel())
    except (AttributeError, TypeError, RuntimeError, ValueError):
        return None


def _input_size(args: Any, kwargs: Optional[dict] = None) -> int:
    """The entries of the tensors among a call's inputs: an eager forward compares them with the
    example's to tell each fast layer's activations at this call."""
    leaves = torch.utils._pytree.tree_leaves((args, kwargs or {}))
    return sum(t.numel() for t in leaves if isinstance(t, torch.Tensor))


def _guard(report, captured, args, kwargs) -> Optional[dict]:
    """The example's input shapes, when some reshape's element map depends on them."""
    node = _shape_dependent_reshape(captured)
    if node is None:
        return None
    if args is None:
        args = ()
    elif isinstance(args, torch.Tensor):
        args = (args,)
    leaves = [t for t in torch.utils._pytree.tree_leaves((tuple(args), dict(kwargs or {})))
              if isinstance(t, torch.Tensor)]
    return {"shapes": [tuple(t.shape[1:]) for t in leaves], "node": node.name,
            "op": str(node.target)}


_RESHAPES = {"view", "_unsafe_view", "reshape", "flatten", "unflatten"}


def _shape_dependent_reshape(captured):
    """The first reshape that merges a dim along which the classes do not change (a spatial or
    sequence dim) inside one along which they do (channels): its element map follows the sizes."""
    for n in captured.gm.graph.nodes:
        if n.op != "call_function" or getattr(getattr(n.target, "overloadpacket", None), "__name__", "") \
                not in _RESHAPES:
            continue
        src = n.args[0]
        v_in, v_out = src.meta.get("ic_value"), n.meta.get("ic_value")
        if not (hasattr(v_in, "ids") and hasattr(v_out, "ids")) or v_in.ids is None or v_out.ids is None:
            continue
        if _layout_depends_on_sizes(tuple(v_in.shape), v_in.ids, tuple(v_out.shape), v_out.ids):
            return n
    return None


def _layout_depends_on_sizes(in_shape, in_ids, out_shape, out_ids) -> bool:
    for ins, outs in _groups(in_shape, out_shape):
        for side, shape, ids in ((ins, in_shape, in_ids), (outs, out_shape, out_ids)):
            if len(side) < 2:
                continue
            vary = [ids.dim() == len(shape) and ids.size(d) > 1 for d in side]
            for a in range(len(side)):
                for b in range(a + 1, len(side)):
                    if vary[a] and not vary[b] and shape[side[b]] > 1:
                        return True
    return False


def _groups(a, b):
    """Align two shapes of equal numel into groups of dims with equal products."""
    i = j = 0
    out = []
    while i < len(a) or j < len(b):
        gi, gj = [i] if i < len(a) else [], [j] if j < len(b) else []
        pa = a[i] if i < len(a) else 1
        pb = b[j] if j < len(b) else 1
        i, j = i + 1, j + 1
        while pa != pb:
            if pa < pb and i < len(a):
                pa *= a[i]
                gi.append(i)
                i += 1
            elif j < len(b):
                pb *= b[j]
                gj.append(j)
                j += 1
            else:
                break
        out.append((gi, gj))
    return out


def _program(cm) -> str:
    plan = cm.allocate
    lines = [f"# {type(cm.model).__name__} compiled to form={cm.form!r}: "
             f"{cm.num_free_parameters()} free of {cm.report.num_params} parameters"]
    v = {n: a for n, a in cm._v_attr.items()}
    if FORMS[cm.form].carriers and cm._allocated:
        if "v_carriers" in cm._parameters:
            lines.append("carriers = v_carriers                           # the carriers' path values")
        else:
            lines.append("carriers = ()                                   # none: their entries are in V")
        what = "constants (scaled coordinates)" if plan._p_in_held else "carrier path values / M"
        lines.append(f"p_in = plan.path_in(carriers)                   # P_in: {what}")
    scaled = FORMS[cm.form].carriers
    formed = plan.formed_now(False)                                 # at the example's size
    index = plan.wa_index(formed)
    wa = {cm._allocated[i] for i in index}
    w_of = lambda name: "w_" + v[name].split("_", 1)[1] if name in wa else v.get(name, "None")
    if cm._fast and scaled:
        when = " (compiled)" if len(formed) == len(cm._fast) else ""
        lines.append(f"scales = plan.linear_scales(p_in, carriers)     # per fast layer{when}: 1/P_in, slot values")
    if index:
        outs = ", ".join(w_of(cm._allocated[i]) for i in index)
        ins = ", ".join(v[cm._allocated[i]] for i in index)
        extra = "p_in, carriers, " if FORMS[cm.form].carriers else "None, None, "
        note = ("; under torch.compile not the fast layers', which scale" if formed else "")
        lines.append(f"{outs} = plan({extra}{ins})   # WA forward, ICR backward{note}")
    if formed:
        lines.append("# (eagerly, at the example's size: a layer forms W where its activations outweigh its weight)")
    for path, (w, b) in cm._fast.items():
        layer = cm.model.get_submodule(path)
        k, conv = layer._ic_index, isinstance(layer, _ScaledConv)
        t = ".t()" if k in plan.is_transposed else ""           # transformers' Conv1D: W is (in, out)
        if scaled:
            call = f"plan.conv(x, {v[w]}, {v.get(b, 'None')}, scales[{k}], {k}, self)" if conv else \
                f"plan.linear(x, {v[w]}, {v.get(b, 'None')}, scales[{k}], {k})"
            if k in formed:
                own = f"self._conv_forward(x, {w_of(w)}, {w_of(b)})" if conv else f"F.linear(x, {w_of(w)}{t}, {w_of(b)})"
                lines.append(f"model.{path}: {own}   # eagerly W formed (WA); compiled: {call}, scaled")
            else:
                lines.append(f"model.{path}: {call}   # scaled activations, no W formed")
        else:
            call = f"self._conv_forward(x, {v[w]}, {v.get(b, 'None')})" if conv else \
                f"F.linear(x, {v[w]}{t}, {v.get(b, 'None')})"
            lines.append(f"model.{path}: {call}   # fixed entries held in place, their gradient zeroed")
    lines.append("return functional_call(model, weights, inputs)   # the model's own forward:")
    code = cm._code
    for ph, name in cm._placeholders.items():    # the graph's parameter inputs, by what they receive
        attr = v.get(name)
        shown = ("w_" + attr.split("_", 1)[1]) if name in wa else (attr or name)
        code = re.sub(rf"\b{re.escape(ph)}\b", shown, code)
    lines.append(code)
    return "\n".join(lines)
