"""Skeleton selection by peeling.

K holds one entry per generator with E_K invertible. We peel in rounds: a class can be fixed once it
has an entry whose other class (if any) was fixed in an earlier round; every class that can, is
fixed in the same round, so E_K is block-triangular with ±1 on the diagonal. Preference: a consumer
entry (towards the output, as G-SGD fixes the outgoing skeleton weights) for rescale classes, a
producer entry for normalize classes; when no class has its preferred kind, any eligible entry.
Among candidates: the one whose value is nearest ±1 (conv kernels: the centre tap of a channel pair).

M[c] is a constant monomial in the K entries with exponent -λ_c: M[c] = w_K(c)^{+1} · M[next] when
K(c) consumes c, w_K(c)^{-1} · M[src] when it produces c. J (G-space only) gives each class a free
producer entry whose source class already has one (or is the input): the carrier, so P_in(c) =
v_J(c) / M[c] is a path value from the input."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

__all__ = ["Skeleton", "build_skeleton"]


@dataclass
class ParamSkeleton:
    name: str
    shape: torch.Size
    inp: torch.Tensor             # compact: column consumed by each entry (-1: none)
    out: torch.Tensor             # compact: column produced by each entry (-1: none)
    fixed_idx: torch.Tensor       # flat indices of K entries in this parameter
    carrier_idx: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    carrier_cls: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))


@dataclass
class Skeleton:
    num_classes: int                       # class generators (rescale + normalize)
    params: dict[str, ParamSkeleton]
    fixed_of: list[tuple[str, int]]        # class -> (parameter, flat index) of its K entry
    order: list[int]                       # peel order of the classes
    consumer: torch.Tensor                 # bool per class: its K entry consumes it
    other: torch.Tensor                    # per class: the other column of its K entry (-1 none)
    carrier_of: list                       # class -> (parameter, flat index) or None
    carrier_src: list = field(default_factory=list)   # class -> source column of its carrier
    carrier_order: list = field(default_factory=list)

    def fixed_mask(self, name: str) -> torch.Tensor:
        p = self.params[name]
        mask = torch.zeros(p.shape.numel(), dtype=torch.bool)
        mask[p.fixed_idx] = True
        return mask.view(p.shape)

    def out_factor(self, weights: dict[str, torch.Tensor]) -> torch.Tensor:
        """M (num_classes + 1,): M[c] has exponent -λ_c; M[-1] = 1 for 'no class'."""
        M = torch.ones(self.num_classes + 1, dtype=torch.float64)
        for c in self.order:
            name, i = self.fixed_of[c]
            w = float(weights[name].reshape(-1)[i])
            M[c] = (w if bool(self.consumer[c]) else 1.0 / w) * M[int(self.other[c])]
        return M

    def in_factor(self, weights: dict[str, torch.Tensor], M: torch.Tensor) -> torch.Tensor:
        """P_in (num_classes + 1,) from plain weights: the product of the carriers from the input,
        exponent +λ_c. Classes without a carrier get 1/M[c] (a constant with the same exponent)."""
        P = torch.ones(self.num_classes + 1, dtype=torch.float64)
        for c in self.carrier_order:
            hit = self.carrier_of[c]
            if hit is None:
                P[c] = 1.0 / M[c]
                continue
            name, i = hit
            P[c] = float(weights[name].reshape(-1)[i]) * P[self.carrier_src[c]]
        return P


def _centre(shape: torch.Size, grid: torch.Size) -> tuple:
    """Index tuple picking, for every grid cell, the centre of the dims the grid broadcasts over."""
    return tuple(slice(None) if g == s else slice(s // 2, s // 2 + 1) for g, s in zip(grid, shape))


def build_skeleton(report, weights: dict[str, torch.Tensor], carriers: bool = True) -> Skeleton:
    gens = [g for g in report.generators if g.kind != "inert"]
    n = len(gens)
    kinds = [g.kind for g in gens]
    params: dict[str, ParamSkeleton] = {}
    grids = {}
    for name in report.param_names:
        shape = report.param_shapes[name]
        if report.is_inert(name):        # every entry is its own generator: all fixed
            none = torch.full((1,) * len(shape), -1, dtype=torch.long)
            params[name] = ParamSkeleton(name, shape, none, none, torch.arange(shape.numel()))
            continue
        inp, out = report.sides(name)
        params[name] = ParamSkeleton(name, shape, inp, out, torch.zeros(0, dtype=torch.long))
        if bool((inp >= 0).any() or (out >= 0).any()):
            grid = torch.broadcast_shapes(inp.shape, out.shape)
            w = weights[name].detach()[_centre(shape, grid)].to(torch.float64).expand(grid)
            score = -w.abs().log().abs()                       # nearest ±1 first
            score[~torch.isfinite(score)] = -math.inf          # zero / non-finite: never fixed
            grids[name] = (inp.expand(grid), out.expand(grid), score, grid)

    done = torch.zeros(n + 1, dtype=torch.bool)
    done[n] = True                                             # index -1: no class
    fixed_of: list = [None] * n
    consumer = torch.zeros(n, dtype=torch.bool)
    other = torch.full((n,), -1, dtype=torch.long)
    order: list[int] = []
    prefer_consumer = torch.tensor([k == "rescale" for k in kinds] + [False])
    live = dict(grids)
    while len(order) < n:
        picked = False
        for strict in (True, False):
            best = torch.full((n + 1,), -math.inf, dtype=torch.float64)
            choice: dict[int, tuple] = {}
            for name, (inp, out, score, grid) in list(live.items()):
                ok_in, ok_out = done[inp], done[out]
                if bool(ok_in.all() and ok_out.all()):
                    del live[name]
                    continue
                for is_consumer, cls, oth, ok_other in ((True, inp, out, ok_out), (False, out, inp, ok_in)):
                    elig = (cls >= 0) & ~done[cls] & ok_other & (score > -math.inf)
                    if strict:
                        elig &= prefer_consumer[cls] == is_consumer
                    if not bool(elig.any()):
                        continue
                    c, s = cls[elig], score[elig]
                    flat = elig.reshape(-1).nonzero().reshape(-1)
                    top = torch.full((n + 1,), -math.inf, dtype=torch.float64).scatter_reduce(
                        0, c, s, "amax")
                    better = top > best
                    for k in better.nonzero().reshape(-1).tolist():
                        j = int(flat[(c == k) & (s == top[k])][0])
                        choice[k] = (name, j, is_consumer, int(oth.reshape(-1)[j]), grid)
                    best = torch.maximum(best, top)
            if choice:
                for k, (name, j, is_consumer, oth, grid) in choice.items():
                    fixed_of[k] = (name, _to_entry(j, grid, params[name].shape))
                    consumer[k], other[k] = is_consumer, oth
                    order.append(k)
                done[list(choice)] = True
                picked = True
                break
        if not picked:
            stuck = [gens[k] for k in range(n) if not done[k]][:3]
            raise RuntimeError(
                f"skeleton: no entry can be fixed for {n - len(order)} generator(s), e.g. {stuck}: "
                f"every candidate entry is zero or non-finite. Re-initialise those weights (or "
                f"perturb them) and compile again.")

    for name in params:
        mine = [j for k, hit in enumerate(fixed_of) if hit[0] == name for j in [hit[1]]]
        if mine:
            params[name].fixed_idx = torch.tensor(sorted(mine), dtype=torch.long)
    sk = Skeleton(n, params, fixed_of, order, consumer, other, [None] * n, [-1] * n)
    sk.carrier_order = _carriers(sk, grids, weights) if carriers else []
    return sk


def _to_entry(j: int, grid: torch.Size, shape: torch.Size) -> int:
    """Flat entry index of grid cell j (centre tap along the broadcast dims)."""
    idx = []
    for g, s in zip(reversed(grid), reversed(shape)):
        idx.append(j % g if g == s else s // 2)
        j //= g
    flat = 0
    for i, s in zip(reversed(idx), shape):
        flat = flat * s + i
    return flat


def _carriers(sk: Skeleton, grids, weights) -> list[int]:
    """Choose J in rounds from the input: a class gets a free producer entry whose source is the
    input or a class resolved earlier (largest |w|: it is divided by). Classes left over (no free
    producer, or cycles) get no carrier: P_in = 1/M, a constant."""
    n = sk.num_classes
    resolved = torch.zeros(n + 1, dtype=torch.bool)
    resolved[n] = True
    order: list[int] = []
    fixed_cells = {}
    for name, (inp, out, score, grid) in grids.items():
        p = sk.params[name]
        mask = torch.zeros(p.shape.numel(), dtype=torch.bool)
        mask[p.fixed_idx] = True
        fixed_cells[name] = mask.view(p.shape)[_centre(p.shape, grid)].expand(grid)
    while True:
        best = torch.full((n + 1,), -math.inf, dtype=torch.float64)
        choice = {}
        for name, (inp, out, score, grid) in grids.items():
            shape = sk.params[name].shape
            w = weights[name].detach()[_centre(shape, grid)].to(torch.float64).expand(grid)
            elig = ((out >= 0) & ~resolved[out] & resolved[inp] & (w != 0) & torch.isfinite(w)
                    & ~fixed_cells[name])
            if not bool(elig.any()):
                continue
            mag = w.abs()[elig]
            c = out[elig]
            flat = elig.reshape(-1).nonzero().reshape(-1)
            top = torch.full((n + 1,), -math.inf, dtype=torch.float64).scatter_reduce(0, c, mag, "amax")
            for k in (top > best).nonzero().reshape(-1).tolist():
                j = int(flat[(c == k) & (mag == top[k])][0])
                choice[k] = (name, _to_entry(j, grid, shape), int(inp.reshape(-1)[j]))
            best = torch.maximum(best, top)
        if not choice:
            break
        for k, (name, e, src) in choice.items():
            sk.carrier_of[k] = (name, e)
            sk.carrier_src[k] = src
            order.append(k)
        resolved[list(choice)] = True
    order += [k for k in range(n) if not resolved[k]]      # no carrier: P_in = 1/M
    for name, p in sk.params.items():
        mine = [(e, k) for k, hit in enumerate(sk.carrier_of) if hit is not None and hit[0] == name
                for e in [hit[1]]]
        if mine:
            p.carrier_idx = torch.tensor([e for e, _ in mine], dtype=torch.long)
            p.carrier_cls = torch.tensor([k for _, k in mine], dtype=torch.long)
    return order
