"""Rotations found from the graph (DESIGN §3.8): `rotate` moves a model along the orthogonal part of
its symmetry group, in place, so that outliers spread over many channels before quantization
(QuaRot's R1 on the residual stream, R2 on each attention's values and outputs, and the maps that
queries and keys share, RoPE's planes under RoPE), on any architecture the analysis walks, with no
adapter per model family."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..analyze.rotations import RotationSpace, find_spaces, occurrences
from ..equalize.quant import outputs_on, relative_change
from ..trace import capture, example_call, preserved
from .matrices import orthogonal

__all__ = ["rotate", "Rotation", "RMSLayerNorm"]


class RMSLayerNorm(nn.LayerNorm):
    """An nn.LayerNorm that does not subtract the mean: an RMSNorm with LayerNorm's bias. It is
    what `rotate(..., layernorm="rmsnorm")` leaves where the writers of the stream now centre it
    (the mean it would subtract is zero), and unlike a LayerNorm it commutes with every orthogonal
    map. Same parameters and state_dict keys; a model holding it is saved with torch.save, since
    its class's from_pretrained would build a LayerNorm."""

    def forward(self, x):
        y = F.rms_norm(x, self.normalized_shape, self.weight, self.eps)
        return y + self.bias if self.bias is not None else y


@dataclass
class Rotation:
    """What `rotate` did: the model (rotated in place), the spaces it rotated (`groups`, each a
    RotationSpace: kind, size, blocks, group, params), the parameters it untied, for every seed
    the walk gave up on, why (`why`: node -> reason), and the LayerNorm modules that became
    RMSLayerNorms (`rmsnorm`, with layernorm="rmsnorm")."""
    model: nn.Module
    groups: list
    untied: list = field(default_factory=list)      # (parameter name, the new parameter's name)
    why: dict = field(default_factory=dict)
    kind: str = "hadamard"
    rmsnorm: list = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"{len(self.groups)} rotation group(s) ({self.kind})",
                 "| kind | channels | group | parameters | found from |", "|---|---|---|---|---|"]
        for g in self.groups:
            lines.append(f"| {g.kind} | {g.size} | {g.group} | {len(g.params)} | {g.module or '-'} ({g.seed}) |")
        for name, new in self.untied:
            lines.append(f"untied {new} from {name}: the rotation needs different values there")
        if self.rmsnorm:
            lines.append(f"{len(self.rmsnorm)} LayerNorm(s) now RMSLayerNorm, the writers centre the stream "
                         f"(save with torch.save, not save_pretrained)")
        return "\n".join(lines)


KINDS = ("residual", "head", "qk", "linear")


def rotate(model: nn.Module, example_inputs: Any = None, example_kwargs: Optional[dict] = None, *,
           kind: str = "hadamard", seed: int = 0, spaces: Sequence[str] = KINDS,
           layernorm: str = "keep", check: bool = True) -> Rotation:
    """Rotate every hidden space of `model` that the graph proves rotatable (the residual stream of
    a pre-norm transformer, each attention's value/output heads and its queries/keys, linear
    bottlenecks), folding the maps into the weights in place; the function is kept (to float
    rounding).

    kind:  "hadamard" (a Hadamard matrix with random signs where the block size is a power of two,
           else random) or "random" (Haar-random orthogonal).
    spaces: which kinds of space to rotate ("residual", "head": values/outputs, "qk": queries/keys,
           "linear": bottlenecks); the others are found and left as they are.
    layernorm: a stream read through LayerNorms, which subtract its mean, admits the maps that fix
           the all-ones vector: "keep" them so (the model keeps its classes, and save_pretrained /
           from_pretrained work); "rmsnorm" takes the mean out at the stream's writers instead and
           turns those LayerNorms into RMSLayerNorms, so that the whole O(n) applies (SliceGPT's
           surgery; where the graph does not allow it, the maps fix 1 and `why` says why).
    check: run the example inputs before and after, and undo everything if the outputs differ by
           more than float rounding (a safety net: the analysis is meant to make it unnecessary)."""
    if kind not in ("hadamard", "random"):
        raise ValueError(f"rotate: kind must be 'hadamard' or 'random', got {kind!r}")
    if set(spaces) - set(KINDS):
        raise ValueError(f"rotate: spaces must be among {KINDS}, got {tuple(spaces)!r}")
    if layernorm not in ("keep", "rmsnorm"):
        raise ValueError(f"rotate: layernorm must be 'keep' or 'rmsnorm', got {layernorm!r}")
    args, kwargs = example_call(model, example_inputs, example_kwargs)
    params = dict(model.named_parameters())
    with preserved(model):
        found, why = find_spaces(capture(model, args, kwargs), params)
    chosen = [s for s in found if s.kind in spaces]
    if layernorm == "rmsnorm":
        chosen = [_as_rmsnorm(model, s, why) for s in chosen]
    gen = torch.Generator().manual_seed(seed)
    maps = [_block_maps(s, kind, gen) for s in chosen]
    values = _fold(chosen, maps, params)
    before = outputs_on(model, args, kwargs) if check else None
    saved = {n: p.detach().clone() for n, p in params.items()} if check else None
    untied = _write(model, values, params)
    swapped = [m for s in chosen if _centres(s) for m in s.norms]
    for m in swapped:
        model.get_submodule(m).__class__ = RMSLayerNorm
    if check:
        after = outputs_on(model, args, kwargs)
        bad = _mismatch(before, after)
        if bad is not None:
            _restore(model, saved, untied)
            for m in swapped:
                model.get_submodule(m).__class__ = nn.LayerNorm
            raise RuntimeError(f"rotate: the rotated model's output differs from the original's by "
                               f"{bad:.3g} (relative): the rotation was undone. Please report this "
                               f"model: an op's rotation rule is wrong.")
    return Rotation(model, chosen, untied, why, kind, swapped)


def _as_rmsnorm(model: nn.Module, space: RotationSpace, why: dict) -> RotationSpace:
    """The space with its LayerNorms as RMSNorms (its writers centre it; the whole O(n)), or as it
    is, with the reason in `why`, where the graph or the modules do not allow it."""
    if not space.centred:
        return space
    reason = space.centring
    for m in space.norms if not reason else ():
        if type(model.get_submodule(m)) is not nn.LayerNorm:
            reason = f"{m} is a {type(model.get_submodule(m)).__name__}, not an nn.LayerNorm"
    if reason:
        why[space.seed] = f"LayerNorm kept, the maps fix 1: {reason}"
        return space
    return dataclasses.replace(space, centred=False)


def _centres(space: RotationSpace) -> bool:
    """Whether rotate takes the space's mean out at its writers (its LayerNorms become RMSNorms)."""
    return bool(space.norms) and not space.centred


def _block_maps(space: RotationSpace, kind: str, gen) -> torch.Tensor:
    """(size, size) float64: the map of the whole space, block by block (v -> v @ Q)."""
    q = torch.eye(space.size, dtype=torch.float64)
    for block in space.blocks:
        idx = torch.tensor(block)
        q[idx[:, None], idx[None, :]] = orthogonal(len(block), kind, gen, fix_ones=space.centred,
                                                   proper=space.proper)
    return q


def _position_map(labels: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """(L, L) map on a tensor axis whose positions hold channels `labels` (-1: none): the k-th
    occurrence of each channel belongs to instance k, and each instance is mapped by q."""
    L = labels.numel()
    out = torch.eye(L, dtype=torch.float64)
    occ = occurrences(labels)
    for k in range(int(occ.max()) + 1 if L else 0):
        pos = ((occ == k) & (labels >= 0)).nonzero().reshape(-1)
        if pos.numel():
            ch = labels[pos]
            out[pos[:, None], pos[None, :]] = q[ch[:, None], ch[None, :]]
    return out


def _vectors(t: torch.Tensor, axis: int, labels: torch.Tensor, q: torch.Tensor,
             gain: Optional[torch.Tensor] = None) -> torch.Tensor:
    """t with its slices along `axis` mapped v -> (v ⊙ gain) @ Q."""
    x = t.movedim(axis, -1)
    if gain is not None:
        g = torch.where(labels >= 0, gain[labels.clamp(min=0)], torch.ones((), dtype=torch.float64))
        x = x * g
    return (x @ _position_map(labels, q)).movedim(-1, axis)


def _fold(spaces, maps, params: dict) -> dict:
    """{(parameter, reading node): new value (float64)}: every space's actions, composed (a writer's
    rows and a reader's columns commute). A space whose LayerNorms become RMSNorms has its writers
    centre it first (v -> v·(I - 11ᵀ/n)·Q)."""
    values: dict = {}
    for space, q in zip(spaces, maps):
        centre = _centres(space)
        qc = q - q.mean(0, keepdim=True) if centre else q          # (I - 11ᵀ/n)·Q
        for a in space.actions:
            key = (a.param, a.node)
            v = values[key][0] if key in values else params[a.param].detach().to(torch.float64).clone()
            if a.role == "vectors":
                v = _vectors(v, a.axis, a.labels, qc if centre and a.node in space.writers else q, a.gain)
            elif a.role == "neutral":
                v = torch.full_like(v, a.value)
            elif a.role == "norm_bias":
                g = a.gain if a.gain is not None else torch.ones(space.size, dtype=torch.float64)
                gl = g[a.labels]
                if bool((gl == 0).any()):
                    raise ValueError(f"rotate: {a.param}'s LayerNorm has a zero gain, so its bias cannot "
                                     f"move behind the rotation")
                v = _vectors(v / gl, 0, a.labels, q)
            values[key] = (v, a.module)
    return values


def _write(model: nn.Module, values: dict, params: dict) -> list:
    """Write the new values in place; a parameter whose uses need different values is untied: each
    other use's module gets its own parameter. Everything is planned (and can fail) before anything
    is written."""
    by_param: dict = {}
    for (name, node), (v, module) in values.items():
        by_param.setdefault(name, []).append((module, v))
    owners: dict = {}
    for full, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(full)
    copies, new_params = [], []
    for name, uses in by_param.items():
        p = params[name]
        home = name.rsplit(".", 1)[0] if "." in name else ""
        uses.sort(key=lambda u: u[0] != home)           # the parameter stays where its name says
        first = uses[0][1]
        copies.append((p, first))
        for module, v in uses[1:]:
            if torch.equal(v, first):
                continue
            names = [n for n in owners[id(p)] if (n.rsplit(".", 1)[0] if "." in n else "") == module]
            if not names:
                raise RuntimeError(f"rotate: {name} is tied, and its use in {module or 'the model'} needs "
                                   f"other values, but no parameter of that module is it: nothing was "
                                   f"changed")
            new_params.append((name, names[0], v.to(p.dtype), p.requires_grad))
    with torch.no_grad():
        for p, v in copies:
            p.copy_(v.to(p.dtype))
    untied = []
    for name, full, v, grad in new_params:
        owner = model.get_submodule(full.rsplit(".", 1)[0]) if "." in full else model
        setattr(owner, full.rsplit(".", 1)[-1], nn.Parameter(v, requires_grad=grad))
        untied.append((name, full))
    if untied:
        cfg = getattr(model, "config", None)
        if cfg is not None and getattr(cfg, "tie_word_embeddings", False):
            cfg.tie_word_embeddings = False       # so that save/load keeps them apart
    return untied


def _mismatch(before, after) -> Optional[float]:
    worst = relative_change(before, after)
    # float64 models may still normalise in float32 (Llama's RMSNorm does); a wrong rule is O(1)
    tol = {torch.float64: 1e-6, torch.float32: 1e-3}
    return worst if worst > max(tol.get(t.dtype, 0.1) for t in before) else None


def _restore(model, saved: dict, untied: list) -> None:
    """Undo _write: the tied parameters tied again (and the config's flag), the values saved."""
    with torch.no_grad():
        for orig, new in untied:
            owner = model.get_submodule(new.rsplit(".", 1)[0]) if "." in new else model
            setattr(owner, new.rsplit(".", 1)[-1], dict(model.named_parameters())[orig])
        if untied and getattr(model, "config", None) is not None and \
                hasattr(model.config, "tie_word_embeddings"):
            model.config.tie_word_embeddings = True
        for n, p in model.named_parameters():
            if n in saved:
                p.copy_(saved[n])
