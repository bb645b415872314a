"""The two forms of a compiled module, each in one place (DESIGN §3.6, §4b):

  gspace  the parameters are invariant coordinates: V for every weight, as raw path values
          (with the carriers' path values, v_carriers) or (the default) scaled ones with P_in held
          and the carriers' entries in V (DESIGN §3.6b); W = WA(V) (kernels/wa.py) forward, the
          ICR (kernels/icr.py) backward.
  fixed   the parameters are the weights themselves with their fixed (K) entries held at their
          values: W = V, those entries kept in V's own storage and their gradient zeroed
          (`hold_fixed`).

Everything the rest of codegen does differently for the two is a method or a constant here."""
from __future__ import annotations

import weakref
from contextlib import nullcontext
from typing import Callable, Optional, Sequence

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from ..kernels import icr as icr_op, wa as wa_op

__all__ = ["FORMS", "GSpace", "Fixed", "WeightAllocation", "fill", "form_of", "hold_fixed", "icr", "keep_held", "overwrite"]


def overwrite(v: torch.Tensor, idx: torch.Tensor, val: torch.Tensor) -> torch.Tensor:
    """v with its entries idx set to val, out of place (differentiable)."""
    if idx.numel() == 0:
        return v
    return v.reshape(-1).index_put((idx,), val).view(v.shape)


def fill(t: torch.Tensor, idx: torch.Tensor, k: torch.Tensor, held: bool = False) -> torch.Tensor:
    """t with k in its slots idx, in t's own storage (no copy of t per forward).

    `held` slots are constants of the chart, the numbers every graph that saved t read there.
    Eagerly they are written on every call, without a test (on a GPU the test would wait for it)
    and without bumping t's version counter, so a graph still waiting for its backward stays
    valid: for it the write changes nothing, or restores what a write by hand moved. Under
    torch.compile a graph may not write into its inputs (inductor's write would bump the counter)
    nor branch on data: it reads them where they are, with one check that they hold k (every
    eager call and optimizer step writes them back, `keep_held`).

    Other slots (raw path values: they follow the carriers) are written eagerly only when they
    differ, with the version bump that makes an older graph refuse its backward; the test
    compares the data itself, since a write through `.data` or a fused step leaves no trace in the
    counter. Under torch.compile, out of place."""
    if not idx.numel():
        return t
    k = k.to(t.dtype)
    if torch.compiler.is_compiling():
        if held:
            torch._assert_async((t.detach().reshape(-1)[idx] == k).all(), _MOVED)
            return t
        return t.detach().reshape(-1).index_put((idx,), k).view(t.shape)
    if held:
        with torch.autograd._unsafe_preserve_version_counter(t) if not t.is_inference() else nullcontext():
            _write(t, idx, k)                                  # (an inference tensor has no counter)
    elif not torch.equal(t.detach().reshape(-1)[idx], k):
        _write(t, idx, k)
    return t


def _write(t: torch.Tensor, idx: torch.Tensor, k: torch.Tensor) -> None:
    """t's entries idx (flat, row-major) = k, in place, outside autograd."""
    if t.is_contiguous():
        t.detach().view(-1).index_copy_(0, idx, k.to(t.dtype))
    else:                                                    # (channels_last)
        t.detach().index_put_(torch.unravel_index(idx, t.shape), k.to(t.dtype))


_MOVED = ("invariance_compiler: entries that a compiled module holds constant were changed in its parameters outside "
          "an optimizer step (a write by hand?), and a torch.compile'd call cannot write them back: call the module "
          "once without torch.compile, which does, then go on")

# id(parameter) -> (a weak reference to it, what gives its held slots (index, values) now); every
# optimizer step writes them back. Keyed by id, not by a weak dictionary: the hook looks up every
# parameter of every optimizer's step, ours or not (0.08 against 0.4 µs a lookup)
_KEPT: dict = {}
_step_hook = None


def keep_held(p: torch.Tensor, slots: Callable[[], Optional[tuple]]) -> None:
    """After each step of any torch.optim optimizer holding p, write p's held slots (`slots()`:
    (flat index, values), or None) back where the step moved them: weight decay moves every
    entry, whatever its gradient. Eager calls write them too; a compiled one relies on this."""
    global _step_hook
    if _step_hook is None:
        _step_hook = register_optimizer_step_post_hook(_write_back)
    key = id(p)
    _KEPT[key] = (weakref.ref(p, lambda _, key=key: _KEPT.pop(key, None)), slots)


def _write_back(optimizer, args, kwargs) -> None:
    """(after a step, which has moved the parameters anyway: written without a test, which on a
    GPU would wait for it)"""
    if not len(_KEPT):
        return
    with torch.no_grad():
        for group in optimizer.param_groups:
            for p in group["params"]:
                kept = _KEPT.get(id(p))
                held = kept[1]() if kept is not None and kept[0]() is p else None
                if held is not None and held[0].numel():
                    _write(p, *held)


def hold_fixed(v: Optional[torch.Tensor], t) -> Optional[torch.Tensor]:
    """Fixed form: v with the fixed entries of plan tensor t at their values. Eagerly v is the
    parameter itself, which holds them in its own storage (`fill`, held: written by every call and
    after every optimizer step, which weight decay moves them in), their gradient zeroed once it is
    accumulated (`ZeroHeld`): no copy of the weight per forward, PyTorch's own autograd nodes. A
    compiled graph reads them where they are (`fill`, held); its parameters carry the hook since
    the module was built (InvariantModule._hold_hooks). A v that is not a parameter takes no hook:
    there, out of place and differentiable (the gradient is 0 at the fixed entries by
    construction)."""
    if v is None or t is None or not t.fixed_idx.numel():
        return v
    if torch.compiler.is_compiling():
        return fill(v, t.fixed_idx, t.fixed_val, held=True)
    if not v.is_contiguous() or not v.is_leaf:  # (channels_last: the slots are row-major flat indices)
        return overwrite(v, t.fixed_idx, t.fixed_val.to(v.dtype))
    fill(v, t.fixed_idx, t.fixed_val, held=True)
    if v.requires_grad:
        ZeroHeld.attach(v, t)
    return v


class ZeroHeld:
    """A fixed-form parameter's post-accumulate-grad hook: its fixed entries are not coordinates,
    so their gradient is 0 before any optimizer (or gradient clipping) reads it. Attached when the
    module is built, again when it is unpickled or deep-copied (hooks are neither copied nor saved
    with a parameter) and by an eager forward that finds it missing; it reads the plan tensor's
    slots when it runs, so a checkpoint of another skeleton and .to() apply."""

    def __init__(self, t):
        self.t = t

    def __call__(self, p: torch.Tensor) -> None:
        g = p.grad
        if g is None or g.layout != torch.strided:
            return
        if g.is_contiguous():
            g.view(-1).index_fill_(0, self.t.fixed_idx, 0)
        else:                                   # (channels_last) row-major flat indices
            g.index_put_(torch.unravel_index(self.t.fixed_idx, g.shape), g.new_zeros(()))

    @staticmethod
    def attach(p: torch.Tensor, t) -> None:
        hooks = p._post_accumulate_grad_hooks
        if not hooks or not any(isinstance(h, ZeroHeld) for h in hooks.values()):
            p.register_post_accumulate_grad_hook(ZeroHeld(t))


class GSpace:
    prefix = "v_"                  # the compiled module's parameter names: v_<weight>, v_carriers
    carriers = True                # the skeleton chooses carriers; the module holds their values
    scales_activations = True      # a Linear may scale its activations instead of forming W

    def coordinates(self, w64: torch.Tensor, P: torch.Tensor, M: torch.Tensor, inp, out) -> torch.Tensor:
        """A weight's path values: w · P_in[in] · M[out]."""
        return w64 * P[inp] * M[out]

    def input_factor(self, sk, weights: dict, M: torch.Tensor) -> torch.Tensor:
        return sk.in_factor(weights, M)

    def trivial(self, ps, inp, out, n: int) -> bool:
        """A tensor with no fixed entry, no relation slot and no class is its own path value:
        nothing to allocate."""
        return ps.fixed_idx.numel() == 0 and ps.relation_idx.numel() == 0 and \
            bool((inp == n).all() and (out == n).all())

    def held(self, ps) -> tuple[torch.Tensor, torch.Tensor]:
        """(fixed entries of W, relation slots of V): a relation generator's fixed entry is a
        constant coordinate V (DESIGN §3.6c)."""
        return ps.fixed_idx, ps.relation_idx

    def carrier_slots(self, ps) -> tuple[torch.Tensor, torch.Tensor]:
        return ps.carrier_idx, ps.carrier_cls

    def path_in(self, plan, carriers: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        return plan.path_in(carriers) if carriers is not None else None

    def allocate(self, plan, p_in, carriers, vs: Sequence[torch.Tensor], index: tuple) -> tuple:
        """The weights of plan tensors `index` (the `wa` group, or `eager_wa`): WA forward, ICR
        backward."""
        vs = list(vs)
        for k in plan.held_in(index):
            vs[k] = plan.tensors[index[k]].hold(vs[k])
        return WeightAllocation.apply(plan, index, p_in, carriers, *vs)

    def reference(self, plan, carriers, vs: Sequence[torch.Tensor]) -> tuple:
        """Every plan tensor's weight with plain differentiable ops (autograd gives the ICR)."""
        slots = [plan.tensor_slots(i) for i in range(len(vs))]
        vs = [overwrite(v, t.rel_idx, t.rel_val) for t, v in zip(plan.tensors, vs)]
        return tuple(wa_op.reference(vs, plan.path_in(carriers), plan.M, carriers, slots))

    def path_values(self, v: torch.Tensor, plan, i: int, carriers) -> torch.Tensor:
        """V in weight shape with the carrier slots filled, the relation slots at their constants
        and the fixed slots zero (in place)."""
        t = plan.tensors[i]
        v.view(-1)[t.fixed_idx] = 0
        v.view(-1)[t.carrier_idx] = carriers[t.carrier_cls]
        v.view(-1)[t.rel_idx] = t.rel_val.to(v.dtype)
        return v


class Fixed:
    prefix = "free_"
    carriers = False
    scales_activations = True      # no scale to apply: a Linear holds its fixed entries in place

    def coordinates(self, w64, P, M, inp, out) -> torch.Tensor:
        return w64.clone()

    def input_factor(self, sk, weights: dict, M: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(M)

    def trivial(self, ps, inp, out, n: int) -> bool:
        return ps.fixed_idx.numel() == 0 and ps.relation_idx.numel() == 0

    def held(self, ps) -> tuple[torch.Tensor, torch.Tensor]:
        """A relation generator's fixed entry is one more fixed weight entry."""
        return torch.cat([ps.fixed_idx, ps.relation_idx]).sort().values, ps.relation_idx.new_zeros(0)

    def carrier_slots(self, ps) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.zeros(0, dtype=torch.long),) * 2

    def path_in(self, plan, carriers) -> None:
        return None

    def allocate(self, plan, p_in, carriers, vs: Sequence[torch.Tensor], index: tuple) -> tuple:
        """The weights are the parameters, their fixed entries held (`hold_fixed`)."""
        return tuple(hold_fixed(v, plan.tensors[i]) for i, v in zip(index, vs))

    def reference(self, plan, carriers, vs: Sequence[torch.Tensor]) -> tuple:
        return tuple(overwrite(v, t.fixed_idx, t.fixed_val) for t, v in zip(plan.tensors, vs))

    def path_values(self, v: torch.Tensor, plan, i: int, carriers) -> torch.Tensor:
        return v


FORMS = {"gspace": GSpace(), "fixed": Fixed()}


def form_of(name: str):
    if name not in FORMS:
        raise ValueError(f"compile_invariant: form must be 'gspace' or 'fixed', got {name!r}")
    return FORMS[name]


class WeightAllocation(torch.autograd.Function):
    """G-space WA forward, ICR backward, over plan tensors `index` at once."""

    @staticmethod
    def forward(ctx, plan, index, p_in, carriers, *vs):
        ctx.plan, ctx.index = plan, index
        ctx.save_for_backward(p_in, carriers, *vs)
        return tuple(wa_op.allocate(vs, p_in, plan.M, carriers, plan.group(index)))

    @staticmethod
    def backward(ctx, *gws):
        p_in, carriers, *vs = ctx.saved_tensors
        plan, index = ctx.plan, ctx.index
        gvs, g_p_in, g_car = icr(plan, p_in, carriers, vs, gws, index)
        for k in plan.held_in(index):                   # relation slots: constants, no coordinates
            if gvs[k] is not None:
                gvs[k].view(-1)[plan.tensors[index[k]].rel_idx] = 0
        return (None, None, g_p_in, g_car, *gvs)


def icr(plan, p_in: torch.Tensor, carriers: torch.Tensor, vs: Sequence[torch.Tensor], gws: Sequence,
        index: Sequence[int]):
    """From ∂L/∂W of tensors `index`: ∂L/∂V (0 on K and J slots), ∂L/∂P_in (the per-class
    reduction Σ ∂L/∂W ⊙ W over free entries) and the direct part of ∂L/∂carriers."""
    gvs, reduced, g_car = icr_op.backward(gws, vs, p_in, plan.M, carriers, plan.group(index))
    return gvs, -reduced / p_in, g_car
