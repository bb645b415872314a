"""The allocation plan: weight allocation (WA) and its backward, the inverse chain rule (ICR), for
the parameters of one compiled model (the ops themselves are in kernels/wa.py and kernels/icr.py,
what differs between the two forms in forms.py).

G-space (DESIGN §3.6, with P_in written directly in path values): for an entry e reading class a
and producing class b,
    W_e = V_e / (P_in[a] · M[b]),
    P_in[a] = c_a / M[a]              (a has a free carrier J(a) whose path value is c_a),
    P_in[a] = w_J · P_in[src]         (its carrier is a fixed entry: the chain of G-SGD's skeleton),
    P_in[a] = 1 / M[a]                (no carrier),
and the K entries are the fixed values. The carriers' path values c live in their own small
parameter (`v_carriers`), not in the weight-shaped V tensors (whose fixed and carrier slots are
unused): P_in then depends on H numbers and its backward costs O(H), not a dense gradient per tensor.
Backward (ICR):
    ∂L/∂V_e     = ∂L/∂W_e / (P_in[a] · M[b])                       (free entries; 0 on K and J slots)
    ∂L/∂P_in[a] = -(1 / P_in[a]) · Σ_{free e reading a} ∂L/∂W_e · W_e   (a per-column reduction)
    ∂L/∂c_a     = ∂L/∂W_J(a) / (P_in[src] · M[a]) + (path_in's backward of ∂L/∂P_in, O(H)).

Scaled coordinates (the default, DESIGN §3.6b): P_in is held at constants, M and P_in with the
exponents of the skeleton's but chosen so that every V_e starts as its weight at the orbit's
typical-scale point (exp(±λ*)). Then W_e = V_e · constant for every entry, the carriers' included:
they are coordinates in V like any other (no J slots, no carrier parameter). This is the chart of
the fixed entries K alone, in which SGD on V is, entry by entry, SGD on the weights at that point.
Raw path values (coordinates="paths", and GSGD) keep P_in a product of carriers, as above. (Plans
saved before 2026-12-07's session i trained the carriers as t = log|c| / unit with P_in moving:
`carrier_sign`, `carrier_unit`; they keep that chart when loaded.)

A Linear layer need not materialise W at all: x @ Wᵀ = ((x / P_in) @ V'ᵀ) / M, so `linear` scales
the (smaller) activations. Fixed form: W = V with the K entries overwritten by their fixed values.

`reference` computes the allocation with plain differentiable ops (tests compare)."""
from __future__ import annotations

import math
import re
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..kernels.layout import Group, Layout, TensorSlots, Tiling, build_group
from .forms import FORMS, fill as _fill, hold_fixed
from .scaled import ScaledProduct

__all__ = ["Allocation", "PlanTensor", "allocation_dtype", "make_allocation", "reference"]


class PlanTensor(nn.Module):
    """One tensor of the plan, as named buffers: its compact class maps (inp, out; `n`: no class),
    its fixed (K) slots with their input class and value, its carrier (J) slots with their classes,
    and the scaled Linear's constants (r_out: 1/M of each output row; slot_idx: the K then the J
    slots; fixed_scaled: w_K·M)."""

    def __init__(self, p: dict, M: torch.Tensor, dtype):
        super().__init__()
        inp, out = (p[k].expand(p["shape"]).reshape(-1) for k in ("inp", "out"))
        k, j, rel = p["fixed_idx"], p["carrier_idx"], p["rel_idx"]
        for name, t in dict(inp=p["inp"], out=p["out"], fixed_idx=k, fixed_in=inp[k],
                            fixed_val=p["fixed_val"].to(dtype), carrier_idx=j, carrier_in=inp[j],
                            carrier_out=out[j], carrier_cls=p["carrier_cls"],
                            r_out=(1.0 / M[p["out"]]).reshape(-1).to(dtype),
                            slot_idx=torch.cat([k, j, rel]),
                            fixed_scaled=(p["fixed_val"].to(torch.float64) * M[out[k]]).to(dtype),
                            rel_idx=rel, rel_val=p["rel_val"].to(dtype)).items():
            self.register_buffer(name, t)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A checkpoint of a module with another skeleton has other numbers of fixed and carrier
        # entries: adopt its shapes (the plan is data; Allocation then rebuilds what derives from it).
        if prefix + "fixed_idx" in state_dict and prefix + "rel_idx" not in state_dict:
            # saved before the relation generators were quotiented: none held
            state_dict[prefix + "rel_idx"] = self.rel_idx.new_zeros(0)
            state_dict[prefix + "rel_val"] = self.rel_val.new_zeros(0)
        for name, buf in self._buffers.items():
            new = state_dict.get(prefix + name)
            if buf is not None and isinstance(new, torch.Tensor) and new.shape != buf.shape:
                self._buffers[name] = torch.empty(new.shape, dtype=buf.dtype, device=buf.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def hold(self, v: torch.Tensor) -> torch.Tensor:
        """v with its relation slots holding their constants (DESIGN §3.6c)."""
        # in V's own storage (its gradient there is zeroed by the ICR), constants in every chart
        return _fill(v, self.rel_idx, self.rel_val, held=True)


_OLD_KEY = re.compile(r"(in|out|fixed_idx|fixed_in|fixed_val|fixed_scaled|carrier_idx|carrier_in|carrier_out|"
                      r"carrier_cls|r_out|slot_idx)(\d+)$")


def _rebuild_layouts(plan, incompatible_keys) -> None:
    plan.log_carriers = bool((plan.carrier_sign != 0).any())     # a checkpoint's coordinates
    plan._build_layouts()


class Allocation(nn.Module):
    """The allocation plan of one compiled model. Tensor i (in plan order) has compact index maps
    into M and P_in (`n` meaning no class), its fixed entries (K slots) and carrier entries (J slots,
    whose values are carrier path values). `wa` lists the tensors allocated by WA; the others are
    the weights and biases of fast layers, used through `linear` and `conv`. A fast layer whose
    `activations` (input and output entries at the example; None: always scale) outweigh its
    weight in a call forms W by WA too in an eager forward (`formed_now`), and scales its
    activations only under torch.compile, where that is the cheaper (DESIGN §3.6)."""
    tiling = Tiling()             # the kernels' tiles (an instance may set its own, then _build_layouts)

    def __init__(self, form: str, num_classes: int, M: torch.Tensor, plans: Sequence[dict], dtype,
                 wa: Sequence[int], chain: Sequence[tuple] = (), free: Optional[torch.Tensor] = None,
                 held: Optional[torch.Tensor] = None, fast: Sequence[tuple[int, int]] = (),
                 activations: Sequence[Optional[float]] = (), transposed: Sequence[int] = ()):
        super().__init__()
        self.form, self.n, self.count, self.wa = form, num_classes, len(plans), list(wa)
        self.fast = [tuple(f) for f in fast]       # (weight, bias or -1) of the layers used through `linear`
        self.activations = list(activations) or [None] * len(self.fast)
        self.transposed = sorted(transposed)       # fast layers whose weight is (in, out): Conv1D
        # sides with no class at all (network input, output) need no scaling, and must not make
        # autograd differentiate through them (a first layer would pay for an input-gradient mm)
        scaled_form = FORMS[form].carriers               # the fixed form scales nothing
        self.scales_in = [scaled_form and bool((p["inp"] < num_classes).any()) for p in plans]
        self.scales_out = [scaled_form and bool((p["out"] != num_classes).any()) for p in plans]
        self.register_buffer("M", M.to(dtype))
        # P_in = path_scale ⊙ [carriers, 1][path_root]: following fixed carriers back to their free
        # root (or to the input) makes every P_in one carrier value times a constant
        scale, root = 1.0 / M[: num_classes + 1].to(torch.float64), path_roots(num_classes, free, chain)
        for cls, src, val in chain:                               # round by round from the input
            scale[cls] = val.to(torch.float64) * scale[src]
        if held is not None:        # scaled coordinates: P_in is these constants (no root carrier)
            scale, root = held.to(torch.float64), torch.full_like(root, num_classes)
        self.register_buffer("path_scale", scale.to(dtype))
        # the carrier path values the plan reads from the module's carrier parameter t: t itself;
        # sign·exp(unit·t) in plans saved with log-magnitude carriers (sign ±1)
        self.register_buffer("carrier_unit", torch.ones(num_classes, dtype=dtype))
        self.register_buffer("carrier_sign", torch.zeros(num_classes, dtype=dtype))
        self.log_carriers = False
        self.register_buffer("path_root", root)
        self.tensors = nn.ModuleList(PlanTensor(p, M, dtype) for p in plans)
        self.shapes = [p["shape"] for p in plans]
        self._build_layouts()
        self.register_load_state_dict_post_hook(_rebuild_layouts)

    def _build_layouts(self) -> None:
        self._build_linear_batch()
        self._layouts, self._held, self._wa_index = {}, {}, {}
        self.__dict__.pop("_held_slots", None)
        if self.wa:       # the kernels' view of the WA group; buffers, so they follow .to(device)
            for name, t in zip(Layout._fields, self._layout_of(self.wa).tensors()):
                self.register_buffer(f"wa_{name}", t.to(self.M.device), persistent=False)

    def tensor_slots(self, i: int) -> TensorSlots:
        """What the kernels read of plan tensor i."""
        t = self.tensors[i]
        return TensorSlots(self.shapes[i], t.inp, t.out, t.fixed_idx, t.fixed_in, t.fixed_val, t.carrier_idx,
                           t.carrier_in, t.carrier_out, t.carrier_cls)

    def _layout_of(self, index: Sequence[int]) -> Layout:
        return build_group([self.tensor_slots(i) for i in index], self.n, self.M.dtype, self.tiling)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # checkpoints before the per-tensor modules kept each tensor's buffers here, numbered
        for key in [k for k in state_dict if k.startswith(prefix)]:
            old = _OLD_KEY.match(key[len(prefix):])
            if old:
                kind, i = old.groups()
                state_dict[f"{prefix}tensors.{i}.{'inp' if kind == 'in' else kind}"] = state_dict.pop(key)
        m = state_dict.get(prefix + "M")
        if isinstance(m, torch.Tensor) and m.shape != self.M.shape:
            # another skeleton's relation units (slots of M after the classes'): adopt its length
            self._buffers["M"] = torch.empty(m.shape, dtype=self.M.dtype, device=self.M.device)
        if m is not None and prefix + "carrier_unit" not in state_dict:       # raw path values
            state_dict[prefix + "carrier_unit"] = torch.ones(m.numel() - 1, dtype=m.dtype)
            state_dict[prefix + "carrier_sign"] = torch.zeros(m.numel() - 1, dtype=m.dtype)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def __getstate__(self):
        state = self.__dict__.copy()
        state.pop("_pending", None)              # a CUDA event: neither copied nor pickled
        state.pop("_held_slots", None)           # a cache
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        if "_p_in_held" not in self.__dict__:    # pickled before P_in could be held
            self._build_held_scales()

    def formed_now(self, compiling: bool, size: float = 1.0) -> tuple:
        """The fast layers (indices into `fast`) whose W a forward forms: none under torch.compile;
        eagerly those whose activations, at `size` times the example's, hold at least as many
        entries as their weight. Scaling costs about six passes over a layer's input and output
        and some 20 small ops, forming W about five passes over its weight in the fused WA/ICR (one
        call for all such weights); measured in DESIGN §3.6. A WA call made only for Linears has a
        cost of its own, which outweighs what they save unless their activations exceed their
        weights by WA_CALL_ENTRIES in all (convolutions, whose scaling costs more per entry, form
        W from less)."""
        acts = self.__dict__.get("activations")
        if compiling or not acts:
            return ()
        sizes = self.__dict__.get("_fast_sizes")
        if sizes is None:
            sizes = self._fast_sizes = [math.prod(self.shapes[i]) for i, _ in self.fast]
        formed = tuple(k for k, (a, w) in enumerate(zip(acts, sizes)) if a is not None and w <= a * size)
        if formed and not self.wa and all(len(self.shapes[self.fast[k][0]]) == 2 for k in formed) and \
                sum(acts[k] * size - sizes[k] for k in formed) < WA_CALL_ENTRIES:
            return ()          # Linears alone, not worth a WA call of their own: scale them too
        return formed

    def wa_index(self, formed: tuple = ()) -> tuple:
        """The tensors WA allocates in a forward that forms the fast layers `formed`: the `wa`
        group and their weights and biases."""
        cache = self.__dict__.setdefault("_wa_index", {})
        index = cache.get(formed)
        if index is None:
            index = cache[formed] = tuple(sorted(self.wa + [i for k in formed for i in self.fast[k] if i >= 0]))
        return index

    def held_in(self, index: tuple) -> list[int]:
        """Positions in `index` of the tensors with relation slots (held before WA, gradient zeroed)."""
        cache = self.__dict__.setdefault("_held", {})
        held = cache.get(index)
        if held is None:
            held = cache[index] = [k for k, i in enumerate(index) if self.tensors[i].rel_idx.numel()]
        return held

    def group(self, index: Sequence[int]) -> Group:
        """Plan tensors `index` as the kernels' ops read them (built once per device and dtype)."""
        key = (tuple(index), self.M.device, self.M.dtype)
        cached = self._layouts.get(key)
        if cached is None:
            if self.wa and list(index) == self.wa:
                lay = Layout(*(getattr(self, f"wa_{name}") for name in Layout._fields[:-1]), self.tiling)
            else:
                lay = self._layout_of(index).to(self.M.device)
            cached = self._layouts[key] = Group([self.tensor_slots(i) for i in index], lay, self.n)
        return cached

    def carrier_values(self, trained: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """The carriers' path values from the module's carrier parameter (DESIGN §3.6b): raw path
        values as they are, scaled ones from their log-magnitudes (signs are constants)."""
        if trained is None or not self.log_carriers:
            return trained
        return self.carrier_sign * (trained * self.carrier_unit).exp()

    def path_in(self, carriers: torch.Tensor) -> torch.Tensor:
        """P_in (n + 1,): free carriers give c / M, fixed carriers extend their source's path by a
        constant; P_in[n] = 1. Differentiable, O(H). With scaled coordinates, constants."""
        if self._p_in_held:      # constants: exp(−λ*), or products of fixed (nonzero) entries
            return self.path_scale
        p = self.path_scale * torch.cat([carriers, carriers.new_ones(1)])[self.path_root]
        if not torch.compiler.is_compiling():
            self._check(p)
        return p

    def _check(self, p_in: torch.Tensor) -> None:
        """A zero or non-finite P_in makes the weights undefined. On CUDA the test is read a call
        later (a pinned copy and an event), so that no forward or step waits for the GPU."""
        if not p_in.is_cuda:
            return _raise_if_bad(p_in)
        pending = self.__dict__.get("_pending")
        if pending is not None and pending[1].query():
            self._pending = None
            if bool(pending[0]):
                _raise_if_bad(pending[2])
        if self.__dict__.get("_pending") is None:
            flag = torch.empty((), dtype=torch.bool, pin_memory=True)
            flag.copy_(_undefined(p_in).any(), non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self._pending = (flag, event, p_in.detach())

    def forward(self, p_in: Optional[torch.Tensor], carriers: Optional[torch.Tensor], *vs,
                index: Optional[tuple] = None) -> tuple:
        """Weights of the tensors `index` (default: the `wa` group; fixed form: p_in and carriers
        are None)."""
        return FORMS[self.form].allocate(self, p_in, carriers, vs, tuple(self.wa) if index is None else index)

    def _build_linear_batch(self) -> None:
        """Index maps that compute, for every fast Linear at once, the numbers it reads besides V
        (see `linear_scales`): one source vector [1/P_in of the input columns | w_K·M·P_in of the
        weights' fixed slots | the biases' fixed slot values | the carriers], gathered by `lin_perm`
        into one segment per Linear, [r_in | the weight's slot values | the bias's slot values]."""
        in_idx, fixed_in, fixed_scaled, bias_fixed, held, parts, self.linear_sizes = [], [], [], [], [], [], []
        scaled = FORMS[self.form].carriers
        r = f = b = h = 0
        for layer, (i, j) in enumerate(self.fast):
            t = self.tensors[i]
            self._bias_scale(layer)
            r_in = _input_channels(t.inp, self.shapes[i], layer in self.is_transposed) if self.scales_in[i] \
                else t.inp.new_zeros(0)
            seg = [("r", r + torch.arange(r_in.numel())), ("f", f + torch.arange(t.fixed_in.numel())),
                   ("c", t.carrier_cls), ("h", h + torch.arange(t.rel_val.numel()))]
            # the fixed form's Linears are not scaled: their slots hold the fixed values themselves
            k = t.fixed_scaled if scaled else t.fixed_val
            in_idx.append(r_in), fixed_in.append(t.fixed_in), fixed_scaled.append(k), held.append(t.rel_val)
            r, f, h = r + r_in.numel(), f + t.fixed_in.numel(), h + t.rel_val.numel()
            nb = 0
            if j >= 0:
                bt = self.tensors[j]
                seg += [("b", b + torch.arange(bt.fixed_scaled.numel())), ("c", bt.carrier_cls),
                        ("h", h + torch.arange(bt.rel_val.numel()))]
                bias_fixed.append(self._bias_fixed(layer) if scaled else bt.fixed_val), held.append(bt.rel_val)
                b, h = b + bt.fixed_scaled.numel(), h + bt.rel_val.numel()
                nb = bt.slot_idx.numel()
            parts.append(seg)
            self.linear_sizes.append((r_in.numel(), t.slot_idx.numel(), nb))
        cat = lambda ts, like: torch.cat(ts) if ts else like
        # carriers last: their number is only known from the call's carrier vector
        offset = {"r": 0, "f": r, "b": r + f, "h": r + f + b, "c": r + f + b + h}
        perm = [idx + offset[kind] for seg in parts for kind, idx in seg]
        empty = self.M.new_zeros(0, dtype=torch.long)
        for name, t in dict(lin_in_idx=cat(in_idx, empty), lin_fixed_in=cat(fixed_in, empty),
                            lin_fixed_scaled=cat(fixed_scaled, self.M.new_zeros(0)),
                            lin_bias_fixed=cat(bias_fixed, self.M.new_zeros(0)),
                            lin_held=cat(held, self.M.new_zeros(0)),
                            lin_perm=cat([p.to(self.M.device) for p in perm], empty)).items():
            self.register_buffer(name, t.to(self.M.device), persistent=False)
        self._build_held_scales()

    def _bias_scale(self, k: int) -> None:
        """Fast layer k's bias enters its product in its rows' units; one with relation units of
        its own (make_allocation) is its coordinates times M[rows] / M[its classes], a constant
        buffer `b_scale_<k>` (None when 1)."""
        i, j = self.fast[k]
        scale = None
        if j >= 0 and FORMS[self.form].carriers:
            r_w, r_b = self.tensors[i].r_out, self.tensors[j].r_out
            if r_w.shape == r_b.shape and not torch.equal(r_w, r_b):
                scale = r_b / r_w
        self.register_buffer(f"b_scale_{k}", scale, persistent=False)

    @property
    def is_transposed(self) -> Sequence[int]:
        """The fast layers whose weight is stored (in, out) (none in plans pickled before them)."""
        return self.__dict__.get("transposed", ())

    def _bias_fixed(self, k: int) -> torch.Tensor:
        """The fixed values of fast layer k's bias in the units of its weight's rows, w_K·M[row]:
        its `fixed_scaled`, unless a checkpoint gave the bias classes of its own (an inert bias
        that was allocated by WA when it was saved: all its entries are fixed). A bias with
        relation units of its own holds them in those (`fixed_scaled`), as its `b_scale` follows."""
        i, j = self.fast[k]
        t, bt = self.tensors[i], self.tensors[j]
        if getattr(self, f"b_scale_{k}", None) is not None:
            return bt.fixed_scaled
        shape = self.shapes[i]
        rows = t.out.expand(shape)[0] if k in self.is_transposed else \
            t.out.expand(shape)[(slice(None),) + (0,) * (len(shape) - 1)]
        if torch.equal(bt.out.expand(rows.shape), rows):
            return bt.fixed_scaled
        return (bt.fixed_val.to(torch.float64) * self.M.to(torch.float64)[rows[bt.fixed_idx]]).to(bt.fixed_scaled.dtype)

    def _build_held_scales(self) -> None:
        """Where P_in is held (scaled coordinates), every number `linear_scales` gives but the
        carriers' is a constant: computed here once (`lin_const`), so that a forward reads
        [lin_const | carriers][lin_perm]: with scaled coordinates no scale needs a gradient."""
        self._p_in_held = FORMS[self.form].carriers and bool((self.path_root == self.n).all())
        const = None
        if self._p_in_held and self.lin_perm.numel():
            p_in = self.path_scale
            const = torch.cat([1.0 / p_in[self.lin_in_idx], self.lin_fixed_scaled * p_in[self.lin_fixed_in],
                               self.lin_bias_fixed, self.lin_held])
        self.register_buffer("lin_const", const, persistent=False)

    def held_slots(self, i: int) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """The entries of plan tensor i's parameter that hold constants in this chart, (flat
        index, values), or None: the fixed form's fixed entries; a fast layer's slots with scaled
        coordinates; the relation slots of a tensor WA allocates. (A fast layer's slots in raw
        path values follow the carriers: written on each call.)"""
        key = (self.M.device, self.M.dtype)
        cached = self.__dict__.get("_held_slots")
        if cached is None or cached[0] != key:
            cached = self._held_slots = (key, self._all_held_slots())
        return cached[1][i]

    def _all_held_slots(self) -> list:
        if not FORMS[self.form].carriers:
            return [(t.fixed_idx, t.fixed_val) if t.fixed_idx.numel() else None for t in self.tensors]
        out = [(t.rel_idx, t.rel_val) if t.rel_idx.numel() else None for t in self.tensors]
        scales = self.linear_scales(None, None) if self._p_in_held and self.fast else None
        for k, (i, j) in enumerate(self.fast):       # a fast layer's slots: [r_in | k | kb] of its scales
            slots = scales[k].split(self.linear_sizes[k])[1:] if scales is not None else (None, None)
            for index, values in zip((i, j), slots):
                if index >= 0:
                    t = self.tensors[index]
                    out[index] = (t.slot_idx, values) if values is not None and t.slot_idx.numel() else None
        return out

    def linear_scales(self, p_in: Optional[torch.Tensor], carriers: Optional[torch.Tensor]) -> list[torch.Tensor]:
        """For each fast Linear (in `fast` order) one vector [1/P_in of its input columns (empty
        when its input has no class) | its weight's slot values: w_K·M·P_in[fixed_in], then its
        carriers' path values | its bias's slot values], all computed together: a few ops per
        forward instead of a few per layer, and one backward through P_in and the carriers."""
        carriers = carriers if carriers is not None else self.M.new_zeros(0)
        if self.lin_const is not None:                 # P_in held: constants, then the carriers
            src = torch.cat([self.lin_const.to(carriers.dtype), carriers])
        elif p_in is None:                             # fixed form: the fixed values, constants
            src = torch.cat([self.lin_fixed_scaled, self.lin_bias_fixed, self.lin_held])
        else:
            src = torch.cat([1.0 / p_in[self.lin_in_idx], self.lin_fixed_scaled * p_in[self.lin_fixed_in],
                             self.lin_bias_fixed, self.lin_held, carriers])
        return list(src[self.lin_perm].split([sum(z) for z in self.linear_sizes]))

    def linear(self, x: torch.Tensor, v: torch.Tensor, bias: Optional[torch.Tensor], scales: torch.Tensor,
               k: int) -> torch.Tensor:
        """F.linear(x, W, b) of fast Linear k without forming W: W = D_out⁻¹ V' D_in⁻¹, so x is scaled
        by 1/P_in and the output by 1/M. V' is V with its fixed slots holding w_K·M·P_in and its
        carrier slots the carriers' path values; in the same units the bias is its own path value.
        `scales` is this Linear's vector from `linear_scales`. One autograd node."""
        i, j = self.fast[k]
        t = self.tensors[i]
        if not FORMS[self.form].carriers:     # fixed form: nothing to scale, PyTorch's own F.linear
            w, b = hold_fixed(v, t), hold_fixed(bias, self.tensors[j]) if j >= 0 else bias
            return F.linear(x, w.t() if k in self.is_transposed else w, b)
        return self._scaled(x, v, bias, scales, k)

    def conv(self, x: torch.Tensor, v: torch.Tensor, bias: Optional[torch.Tensor], scales: torch.Tensor, k: int,
             module: nn.Module) -> torch.Tensor:
        """`module`'s convolution (an nn.Conv1d/2d/3d with groups 1 and zero padding) of x with W
        and b, fast layer k: as `linear`, x scaled per input channel and the output per output
        channel."""
        i, j = self.fast[k]
        if not FORMS[self.form].carriers:     # fixed form: PyTorch's own convolution
            return module._conv_forward(x, hold_fixed(v, self.tensors[i]),
                                        hold_fixed(bias, self.tensors[j]) if j >= 0 else bias)
        return self._scaled(x, v, bias, scales, k, (module.stride, module.padding, module.dilation))

    def _scaled(self, x, v, bias, scales, k: int, conv: Optional[tuple] = None) -> torch.Tensor:
        i, j = self.fast[k]
        t = self.tensors[i]
        b_slot = self.tensors[j].slot_idx if j >= 0 else None
        r_out = t.r_out if self.scales_out[i] else None
        return ScaledProduct.apply(x, v, bias, scales, self.linear_sizes[k], r_out, t.slot_idx, b_slot, conv,
                                   k in self.is_transposed, getattr(self, f"b_scale_{k}", None), self._p_in_held)


# Entries by which the activations of Linears must outweigh their weights, summed, for an eager
# call to form their W by a WA call of their own (the 2-core CPU, SGD steps over the plain
# model's, interleaved; scaling every Linear / forming the outweighed ones: an MLP 784-1024x3-10
# at batch 256, 255K entries: 1.077-1.079 / 1.086-1.089 (benchmarks/train_step.py, alternating
# runs); 256-256-10 at batch 64, 14K: 1.85-1.88 / 2.09-2.11 (both orders of interleaving); an
# MLP 784-1024-1024-10 at batch 1024, 3.1M: 1.05 / 1.04; 784-512-512-10 at batch 4096, 11M:
# 1.08-1.12 / 1.03)
WA_CALL_ENTRIES = 1_000_000


def path_roots(n: int, free: Optional[torch.Tensor], chain: Sequence[tuple]) -> torch.Tensor:
    """(n + 1,) the free carrier each class's P_in follows back to through fixed carriers (n: the
    input, or no carrier)."""
    root = torch.full((n + 1,), n, dtype=torch.long)
    if free is not None:
        root[free] = free
    for cls, src, _ in chain:                                     # round by round from the input
        root[cls] = root[src]
    return root


def _undefined(p_in: torch.Tensor) -> torch.Tensor:
    """Where P_in cannot divide: p + 1/p is finite exactly when p is finite and neither zero nor so
    small that the weights it divides overflow (one pass instead of two tests)."""
    return ~torch.isfinite(p_in + p_in.reciprocal())


def _raise_if_bad(p_in: torch.Tensor) -> None:
    bad = _undefined(p_in)
    if bool(bad.any()):
        bad = bad.nonzero().reshape(-1)[:5].tolist()
        raise FloatingPointError(
            f"weight allocation: the carrier path value of class(es) {bad} is zero or non-finite "
            f"(or too small to divide by), so the weights it divides are undefined. Lower the "
            f"learning rate, or export the weights (export_state_dict) and compile again to choose "
            f"new carriers.")


def allocation_dtype(params) -> torch.dtype:
    """The dtype of the allocation: that of the first floating-point parameter (integer ones are
    constants the analysis pins)."""
    return next((p.dtype for p in params if p.is_floating_point()), torch.get_default_dtype())


def make_allocation(report, sk, weights: dict, form: str, names: Sequence[str], dtype,
                    linear: dict | None = None, units: Optional[torch.Tensor] = None,
                    activations: Optional[dict] = None, transposed: frozenset = frozenset()):
    """The allocation plan and initial parameters for the parameters `names`; the weights in
    `linear` (gspace; weight name -> bias name or None) and their biases are used through
    Allocation.linear (or .conv) instead of WA, in an eager forward only where their
    `activations` (weight name -> input and output entries at the example, None: always) do not
    outweigh them; those in `transposed` are stored (in, out).
    `units` (gspace): the classes' log-scales λ* to the orbit's typical-scale point
    (skeleton.typical_scales); the coordinates are then in its units, each equal to its weight at
    that point (DESIGN §3.6b), instead of raw path values.
    Returns (Allocation, {name: initial V or free tensor}, [names in plan order], carriers or None)."""
    rules = FORMS[form]
    held_chart = units is not None and rules.carriers           # scaled: P_in held (DESIGN §3.6b)
    n = sk.num_classes
    M = sk.out_factor(weights)
    P = rules.input_factor(sk, weights, M)
    if units is not None and rules.carriers:
        # any constants M̃[b], P̃[a] with the exponents of M and P_in give invariant coordinates
        # w·P̃[a]·M̃[b]; these make them the weights at that point, w·exp(λ*_b − λ*_a)
        one = torch.ones(1, dtype=torch.float64)
        M, P = torch.cat([units[:n].exp(), one]), torch.cat([(-units[:n]).exp(), one])
    moves = _relation_moves(sk, weights, P, M, units[n:] if units is not None else None) \
        if rules.carriers else None
    sides = {}
    for name in names:
        ps = sk.params[name]
        inp, out = torch.where(ps.inp < 0, n, ps.inp), torch.where(ps.out < 0, n, ps.out)
        sides[name] = (inp, out, rules.trivial(ps, inp, out, n))
    # each tensor's relation units (DESIGN §3.6c), compact: a tensor with units is allocated
    rel_scale = {name: _relation_units(sk.params[name], moves) for name in names}
    for name in names:
        if sides[name][2] and not bool((rel_scale[name] == 1).all()):
            sides[name] = sides[name][:2] + (False,)
    # a Linear (or convolution) goes through `linear` only if its weight is allocated at all (a
    # frozen one is not), its input classes are per input channel and its output classes and
    # relation units, if any, per output channel (they join the output scaling)
    linear = {w: b for w, b in (linear or {}).items() if rules.scales_activations and not sides[w][2]
              and _per_channel(sides[w][0], sides[w][1], rel_scale[w], len(sk.params[w].shape), w in transposed)}
    for w, b in linear.items():
        # `linear` adds the bias before the output scaling 1/M, so a bias enters in the units of
        # its weight's rows; an inert bias has no class of its own, so give it the rows' (its value
        # still matters to what follows the centring: BatchNorm's running mean, eval mode)
        if b and report.is_inert(b):
            inp, _, trivial = sides[b]
            sides[b] = (inp, sides[w][1].reshape(-1), trivial)        # rows of (out, 1, …)
            rel_scale[b] = rel_scale[w].reshape(-1)
    # a bias whose relation units differ from its rows' (GPT-2's key bias is on no query/key
    # generator) keeps its own; the layer multiplies it by the constant ratio (Allocation.
    # _bias_scale), which must be 1 at its carrier and relation slots (their values are the rows')
    same_units = lambda w, b: torch.equal(*(t.expand(sk.params[b].shape) for t in (rel_scale[b], rel_scale[w].reshape(-1))))
    own_units = {b for w, b in linear.items() if b and not same_units(w, b)}
    linear = {w: b for w, b in linear.items() if b not in own_units or _ratio_fits(
        sk.params[b], rel_scale[w].reshape(-1) / rel_scale[b], sides[b][1], sides[w][1].reshape(-1), rules)}
    in_linear = set(linear) | {b for b in linear.values() if b}
    units_out, extra = _unit_slots(names, {k: sides[k][1] for k in names}, rel_scale, M, n)
    for w, b in linear.items():          # a bias read through `linear` is in its weight rows' units
        if b and w in units_out and b not in own_units:
            units_out[b] = units_out[w].reshape(-1)
    carriers = torch.zeros(n, dtype=torch.float64)
    init, planned, plans, wa = {}, [], [], []
    for name in names:
        ps = sk.params[name]
        inp, out, trivial = sides[name]
        w64 = weights[name].detach().to(torch.float64)
        # in the relation generators' units too; contiguous: the slot indices are row-major, and
        # reshape of a channels_last tensor copies
        v = (rules.coordinates(w64, P, M, inp, out) * rel_scale[name]).contiguous()
        fixed_idx, rel_idx = rules.held(ps)
        # with P_in held a carrier entry is a coordinate like any other, kept in V
        jx, jc = rules.carrier_slots(ps) if not held_chart else (fixed_idx[:0],) * 2
        carriers[jc] = v.reshape(-1)[jx]                       # the carriers' path values
        rel_val = v.reshape(-1)[rel_idx].clone()                # constants: the relation slots
        v.reshape(-1)[fixed_idx] = 0.0                         # K and J slots of V are unused
        v.reshape(-1)[jx] = 0.0
        # integer parameters (indices, counts) cannot scale: the analysis pins them; keep them exact
        init[name] = v.to(dtype) if weights[name].is_floating_point() else weights[name].clone()
        if not trivial:
            if name not in in_linear:
                wa.append(len(planned))
            planned.append(name)
            plans.append({"inp": inp, "out": units_out.get(name, out), "shape": ps.shape, "fixed_idx": fixed_idx,
                          "fixed_val": weights[name].detach().reshape(-1)[fixed_idx].clone(),
                          "carrier_idx": jx, "carrier_cls": jc, "rel_idx": rel_idx, "rel_val": rel_val})
    chain, free = [], None
    if rules.carriers and not held_chart:
        fixed = sk.carrier_fixed & (sk.carrier_round >= 0)
        free = ((sk.carrier_param >= 0) & ~sk.carrier_fixed).nonzero().reshape(-1)
        vals = sk._values(weights, sk.carrier_param, sk.carrier_entry)
        for r in range(int(sk.carrier_round.max()) + 1 if n else 0):
            cls = (fixed & (sk.carrier_round == r)).nonzero().reshape(-1)
            if cls.numel():
                chain.append((cls, torch.where(sk.carrier_src[cls] < 0, n, sk.carrier_src[cls]), vals[cls]))
    held = P if held_chart else None
    fast_names = [w for w in linear if w in planned and planned.index(w) not in wa]
    fast = [(planned.index(w), planned.index(linear[w]) if linear[w] in planned else -1) for w in fast_names]
    acts = [(activations or {}).get(w) if rules.carriers else None for w in fast_names]
    flipped = [k for k, w in enumerate(fast_names) if w in transposed]
    plan = Allocation(form, n, torch.cat([M] + extra), plans, dtype, wa, chain, free, held, fast, acts, flipped)
    carriers = carriers[:0] if held_chart else carriers       # none: they are in V
    return plan, init, planned, (carriers.to(dtype) if rules.carriers else None)


def _ratio_fits(ps, ratio: torch.Tensor, classes: torch.Tensor, rows: torch.Tensor, rules) -> bool:
    """Whether a fast layer's bias with relation units of its own can be read as its coordinates
    times a constant ratio: its classes are its rows' and the ratio is 1 at its carrier and
    relation slots (its fixed slots are written in its own units: Allocation._bias_fixed)."""
    ratio = ratio.expand(ps.shape).reshape(-1)
    slots = torch.cat([rules.held(ps)[1], rules.carrier_slots(ps)[0]])
    return torch.equal(classes.expand(ps.shape), rows.expand(ps.shape)) and bool((ratio[slots] == 1).all())


def _input_channels(inp: torch.Tensor, shape, transposed: bool = False) -> torch.Tensor:
    """A fast layer's input class per input channel (dim 1; dim 0 when `transposed`) from its
    class map, which may be stored compact or (checkpoints of older versions) in full."""
    full = inp.expand(shape)
    if transposed:
        row = full[:, 0]
        same = torch.equal(full, row.view(-1, 1).expand(shape))
    else:
        row = full[(0, slice(None)) + (0,) * (len(shape) - 2)]
        same = torch.equal(full, row.view((1, -1) + (1,) * (len(shape) - 2)).expand(shape))
    if not same:
        raise ValueError(f"allocation plan: a weight of shape {tuple(shape)} through the scaled-activation "
                         f"path has input classes that vary along its rows; compile with "
                         f"scale_activations=False to load this checkpoint")
    return row


def _per_channel(inp: torch.Tensor, out: torch.Tensor, units: torch.Tensor, ndim: int,
                 transposed: bool = False) -> bool:
    """Whether a weight's compact maps vary only along dim 1 (inputs) and dim 0 (outputs, units),
    or (`transposed`, a 2-d weight stored (in, out)) along dim 0 and dim 1."""
    shape = lambda t: (1,) * (ndim - t.dim()) + tuple(t.shape)
    if transposed:
        return ndim == 2 and shape(inp)[1] == 1 and all(shape(t)[0] == 1 for t in (out, units))
    return ndim >= 2 and shape(inp)[0] == 1 and all(d == 1 for d in shape(inp)[2:]) and \
        all(d == 1 for t in (out, units) for d in shape(t)[1:])


def _unit_slots(names, outs: dict, units: dict, M: torch.Tensor, n: int):
    """WA divides by M[out]: a tensor with relation units reads them from slots of M after the
    classes' (M[n + 1:]), one per cell of its compact out map, each holding M[out]·units. Returns
    ({name: its out map into those slots}, [the slots' values per tensor])."""
    out_maps, extra = {}, []
    start = n + 1
    for name in names:
        if bool((units[name] == 1).all()):
            continue
        shape = torch.broadcast_shapes(outs[name].shape, units[name].shape)
        vals = (M[outs[name]] * units[name]).expand(shape).reshape(-1)
        out_maps[name] = start + torch.arange(vals.numel()).view(shape)
        extra.append(vals)
        start += vals.numel()
    return out_maps, extra


def _relation_units(ps, moves: Optional[torch.Tensor]) -> torch.Tensor:
    """exp(coef · move) of the relation generator each entry lies on, compact: each quotiented one
    moves V to its canonical point, and like M and P_in these units are constants that WA divides
    out again, so that W is the weight (DESIGN §3.6c)."""
    if moves is None or not bool((ps.rel_col >= 0).any()):
        return torch.ones((1,) * len(ps.shape), dtype=torch.float64)
    return (ps.rel_coef * moves[ps.rel_col]).exp()


def _relation_moves(sk, weights: dict, P: torch.Tensor, M: torch.Tensor, units: Optional[torch.Tensor]):
    """(R + 1,) the log-scale by which each quotiented relation generator moves V to its canonical
    point (the last slot, no relation: 0): with scaled coordinates its part of the typical-scale
    point λ*; with raw path values the one that makes |V| = 1 at its fixed entry."""
    moves = torch.zeros(sk.num_relations + 1, dtype=torch.float64)
    if units is not None:
        moves[:-1] = torch.where(sk.relation_param >= 0, units, 0.0)
        return moves
    inp, out, coef = sk.relation_sides()
    log_v = (sk._values(weights, sk.relation_param, sk.relation_entry) * P[inp] * M[out]).abs().log()
    moves[:-1] = -coef * log_v
    return moves


def reference(plan: Allocation, carriers: Optional[torch.Tensor], vs: Sequence[torch.Tensor]) -> tuple:
    """Every plan tensor's weight with plain differentiable ops (autograd gives the ICR)."""
    return FORMS[plan.form].reference(plan, carriers, vs)
