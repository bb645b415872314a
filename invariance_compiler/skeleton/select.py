"""Skeleton selection by peeling.

K holds one entry per generator with E_K invertible. We peel in rounds: a class can be fixed once it
has an entry whose other class (if any) was fixed in an earlier round; every class that can, is
fixed in the same round, so E_K is block-triangular with ±1 on the diagonal. Preference: a consumer
entry (towards the output, as G-SGD fixes the outgoing skeleton weights) for rescale classes, a
producer entry for normalize classes; when no class has its preferred kind, any eligible entry
(consumers first). Among candidates: the largest at the orbit's canonical point (all fixed entries
at |w| = 1): for a consumer the largest |w|·M[next], the largest product of fixed entries to the
output (conv kernels: the centre tap of a channel pair). A group element moves every candidate of
a class by the same factor, so a model and any rescaled copy choose the same entries (DESIGN §3.4);
scores are rounded and ties go to the first parameter and entry. A model whose skeleton entries
were set to 1 (G-SGD's initialisation) gets those entries back.

M[c] is a constant monomial in the K entries with exponent -λ_c: M[c] = w_K(c)^{+1} · M[next] when
K(c) consumes c, w_K(c)^{-1} · M[src] when it produces c. J (G-space only) gives each class a carrier:
a producer entry whose source class already has one (or is the input), preferring the fixed entry
that enters it (G-SGD's skeleton path), so P_in(c) = w_J · P_in(src) is the value of a path from
the input through fixed entries and one free first-layer entry: products of fixed entries stay
near ±1, so path values keep the size of single weights. With a free carrier, P_in(c) = v_J / M[c].

Everything runs per parameter on compact channel grids (a conv's (C_out, C_in/g) pairs, not its
taps), vectorised over classes: ResNet-50's 38k classes take a few seconds."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

__all__ = ["Skeleton", "build_skeleton", "check_finite"]

NEG = -math.inf


@dataclass
class ParamSkeleton:
    name: str
    shape: torch.Size
    inp: torch.Tensor             # compact: column consumed by each entry (-1: none)
    out: torch.Tensor             # compact: column produced by each entry (-1: none)
    fixed_idx: torch.Tensor       # flat indices of K entries in this parameter
    carrier_idx: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    carrier_cls: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    rel_col: torch.Tensor = None  # compact: relation generator of each entry (-1: none)
    rel_coef: torch.Tensor = None  # compact: its exponent there (±1)
    relation_idx: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))


@dataclass
class Skeleton:
    num_classes: int
    names: list[str]                       # parameter index -> name
    params: dict[str, ParamSkeleton]
    fixed_param: torch.Tensor              # (n,) parameter index of each class's K entry
    fixed_entry: torch.Tensor              # (n,) its flat index
    consumer: torch.Tensor                 # (n,) bool: the K entry consumes the class
    other: torch.Tensor                    # (n,) the K entry's other column (-1: none)
    fixed_round: torch.Tensor              # (n,) peel round
    carrier_param: torch.Tensor            # (n,) parameter index of the carrier (-1: none)
    carrier_entry: torch.Tensor            # (n,)
    carrier_src: torch.Tensor              # (n,) the carrier's source column (-1: the input)
    carrier_round: torch.Tensor            # (n,) round in which the carrier was chosen (-1: none)
    carrier_fixed: torch.Tensor = None     # (n,) bool: the carrier is a K entry (a constant)
    # relation generators (report columns num_simple + r): the parameter index and flat entry of
    # each one's fixed entry, -1 for one left in the coordinates (DESIGN §3.6c)
    relation_param: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    relation_entry: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))

    @property
    def order(self) -> list[int]:
        return torch.argsort(self.fixed_round, stable=True).tolist()

    @property
    def fixed_of(self) -> list[tuple[str, int]]:
        return [(self.names[p], e) for p, e in zip(self.fixed_param.tolist(), self.fixed_entry.tolist())]

    @property
    def carrier_of(self) -> list:
        return [None if p < 0 else (self.names[p], e)
                for p, e in zip(self.carrier_param.tolist(), self.carrier_entry.tolist())]

    _STATE = ("fixed_param", "fixed_entry", "consumer", "other", "fixed_round", "carrier_param",
              "carrier_entry", "carrier_src", "carrier_round", "carrier_fixed", "relation_param",
              "relation_entry")

    @property
    def num_relations(self) -> int:
        return int(self.relation_param.numel())

    @property
    def num_fixed(self) -> int:
        """Entries held constant: K (and inert entries), plus one per quotiented relation."""
        return sum(p.fixed_idx.numel() for p in self.params.values()) + int((self.relation_param >= 0).sum())

    def state(self) -> dict[str, torch.Tensor]:
        """The choices, as tensors (checkpoints); `from_state` rebuilds the skeleton."""
        return {k: getattr(self, k).clone() for k in self._STATE}

    @classmethod
    def from_state(cls, report, state: dict) -> "Skeleton":
        names = list(report.param_names)
        params = {}
        for name in names:
            shape = report.param_shapes[name]
            if report.is_inert(name):
                none = torch.full((1,) * len(shape), -1, dtype=torch.long)
                params[name] = ParamSkeleton(name, shape, none, none, torch.arange(shape.numel()),
                                             rel_col=none, rel_coef=torch.zeros_like(none))
            else:
                inp, out = report.sides(name)
                rel = report.relation_side(name)
                params[name] = ParamSkeleton(name, shape, inp, out, report.inert_entries(name),
                                             rel_col=rel.col, rel_coef=rel.coef)
        none = torch.full((report.num_relations,), -1, dtype=torch.long)   # checkpoints before them
        state = {"relation_param": none, "relation_entry": none, **state}
        sk = cls(int(state["fixed_param"].numel()), names, params, *[state[k] for k in cls._STATE])
        sk._place_relations()
        for pi in sk.fixed_param.unique().tolist():
            ps = params[names[pi]]
            ps.fixed_idx = torch.cat([sk.fixed_entry[sk.fixed_param == pi], ps.fixed_idx]).sort().values
        free = (sk.carrier_param >= 0) & ~sk.carrier_fixed
        for pi in sk.carrier_param[free].unique().tolist():
            sel = (free & (sk.carrier_param == pi)).nonzero().reshape(-1)
            params[names[pi]].carrier_idx, params[names[pi]].carrier_cls = sk.carrier_entry[sel], sel
        return sk

    def _place_relations(self) -> None:
        """Each parameter's relation_idx from relation_param / relation_entry."""
        for pi in self.relation_param[self.relation_param >= 0].unique().tolist():
            self.params[self.names[pi]].relation_idx = self.relation_entry[self.relation_param == pi]

    def relation_sides(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(class consumed, class produced (n: none), exponent on its generator) of each relation
        generator's fixed entry; n, n and 0 for one left in the coordinates."""
        n, R = self.num_classes, self.num_relations
        inp, out = torch.full((R,), n, dtype=torch.long), torch.full((R,), n, dtype=torch.long)
        coef = torch.zeros(R, dtype=torch.long)
        for pi in self.relation_param[self.relation_param >= 0].unique().tolist():
            sel = self.relation_param == pi
            ps, e = self.params[self.names[pi]], self.relation_entry[sel]
            at = lambda t: t.expand(ps.shape).reshape(-1)[e]
            inp[sel], out[sel], coef[sel] = at(ps.inp) % (n + 1), at(ps.out) % (n + 1), at(ps.rel_coef)
        return inp, out, coef

    def fixed_mask(self, name: str) -> torch.Tensor:
        p = self.params[name]
        mask = torch.zeros(p.shape.numel(), dtype=torch.bool)
        mask[p.fixed_idx] = True
        return mask.view(p.shape)

    def _values(self, weights, param_idx, entry_idx) -> torch.Tensor:
        out = torch.ones(param_idx.shape, dtype=torch.float64)
        for p in param_idx.unique().tolist():
            if p < 0:
                continue
            sel = param_idx == p
            out[sel] = weights[self.names[p]].detach().reshape(-1)[entry_idx[sel]].to(torch.float64)
        return out

    def out_factor(self, weights: dict[str, torch.Tensor]) -> torch.Tensor:
        """M (n + 1,): M[c] has exponent -λ_c; M[n] = 1 ('no class')."""
        n = self.num_classes
        M = torch.ones(n + 1, dtype=torch.float64)
        w = self._values(weights, self.fixed_param, self.fixed_entry)
        own = torch.where(self.consumer, w, 1.0 / w)
        other = torch.where(self.other < 0, n, self.other)
        for r in range(int(self.fixed_round.max()) + 1 if n else 0):
            sel = self.fixed_round == r
            M[:n][sel] = own[sel] * M[other[sel]]
        return M

    def in_factor(self, weights: dict[str, torch.Tensor], M: torch.Tensor) -> torch.Tensor:
        """P_in (n + 1,) from plain weights: the product of the carriers from the input, exponent
        +λ_c. Classes without a carrier get 1/M[c] (a constant with the same exponent)."""
        n = self.num_classes
        P = torch.ones(n + 1, dtype=torch.float64)
        P[:n] = 1.0 / M[:n]
        w = self._values(weights, self.carrier_param, self.carrier_entry)
        src = torch.where(self.carrier_src < 0, n, self.carrier_src)
        for r in range(int(self.carrier_round.max()) + 1 if n else 0):
            sel = self.carrier_round == r
            P[:n][sel] = w[sel] * P[src[sel]]
        return P


def _centre(shape: torch.Size, grid: torch.Size) -> tuple:
    """Index tuple picking, for every grid cell, the centre of the dims the grid broadcasts over."""
    return tuple(slice(None) if g == s else slice(s // 2, s // 2 + 1) for g, s in zip(grid, shape))


class _Grid:
    """One parameter's channel grid: its weights at the centre tap of each channel pair, which of
    them are usable (non-zero and finite: never fixed, never a carrier), and the class each pair
    consumes (`inp`) and produces (`out`), compact (broadcastable to the grid; n: none). Masks are
    made by broadcasting per-class masks, and classes and log-magnitudes are read at the chosen
    cells only: a Llama's 100M weights are read a few times, not once per mask and round."""

    def __init__(self, w: torch.Tensor, inp: torch.Tensor, out: torch.Tensor, n: int, rel: torch.Tensor):
        self.grid = torch.broadcast_shapes(inp.shape, out.shape, rel.shape)
        self.w = w[_centre(w.shape, self.grid)].expand(self.grid).reshape(-1)
        self.ok = (self.w != 0) & torch.isfinite(self.w)
        self.inp, self.out = torch.where(inp < 0, n, inp), torch.where(out < 0, n, out)
        self.inp_classes, self.out_classes = self.inp.unique(), self.out.unique()
        # cells off every relation generator: K and J entries there keep V invariant under them,
        # so each relation generator can then be quotiented by one more entry (DESIGN §3.6c)
        self.clean = rel < 0

    def cells(self, *masks: torch.Tensor) -> torch.Tensor:
        """Flat indices of the usable cells where every compact mask holds."""
        m = masks[0]
        for x in masks[1:]:
            m = m & x
        return (m.expand(self.grid).reshape(-1) & self.ok).nonzero().reshape(-1)

    def at(self, cls: torch.Tensor, cells: torch.Tensor) -> torch.Tensor:
        """The compact tensor `cls` (inp or out) read at flat grid cells."""
        dims = [d for d, c in enumerate(cls.shape) if c > 1]
        if len(dims) == 1:                  # a Linear's or a conv's side: one division at most
            d = dims[0]
            inner = math.prod(self.grid[d + 1:])
            idx = cells // inner if inner > 1 else cells
            return cls.reshape(-1)[idx % self.grid[d] if d > 0 else idx]
        idx, stride, rest = torch.zeros_like(cells), 1, cells
        for g, c in zip(reversed(self.grid), reversed(cls.shape)):
            if c > 1:
                idx = idx + (rest % g) * stride
                stride *= c
            rest = rest // g
        return cls.reshape(-1)[idx]

    def logw(self, cells: torch.Tensor) -> torch.Tensor:
        return self.w[cells].to(torch.float64).abs().log()


def _cell_to_entry(cells: torch.Tensor, grid: torch.Size, shape: torch.Size) -> torch.Tensor:
    """Flat entry index of grid cells (the centre tap along the dims the grid broadcasts over)."""
    flat = torch.zeros_like(cells)
    rest = cells.clone()
    coords = []
    for g in reversed(grid):
        coords.append(rest % g)
        rest = rest // g
    for (c, g, s) in zip(reversed(coords), grid, shape):
        flat = flat * s + (c if g == s else s // 2)
    return flat


def _best_per_class(cls: torch.Tensor, score: torch.Tensor, n: int):
    """Highest score per class (n + 1 slots) and the position of its first occurrence."""
    top = torch.full((n + 1,), NEG, dtype=torch.float64).scatter_reduce(0, cls, score, "amax")
    hit = score == top[cls]
    big = cls.numel()
    pos = torch.full((n + 1,), big, dtype=torch.long).scatter_reduce(
        0, cls[hit], torch.arange(big)[hit], "amin")
    return top, pos


def check_finite(weights: dict, who: str) -> None:
    """Refuse non-finite weights, naming the parameter: the skeleton divides by weights."""
    for name, w in weights.items():
        if w.is_floating_point() and not bool(torch.isfinite(w).all()):
            bad = (~torch.isfinite(w)).nonzero()
            raise ValueError(f"{who}: parameter '{name}' has {bad.shape[0]} non-finite entries (first at "
                             f"index {tuple(bad[0].tolist())}: {w[tuple(bad[0])].item()}); the skeleton divides "
                             f"by weights and would spread them. Repair or re-initialise it first.")


def build_skeleton(report, weights: dict[str, torch.Tensor], carriers: bool = True) -> Skeleton:
    gens = report.class_generators[: report.num_simple]     # the plain classes: ±1 sides
    n = len(gens)
    names = list(report.param_names)
    params: dict[str, ParamSkeleton] = {}
    grids = {}
    mixed: set[int] = set()                 # relation generators no single entry can fix
    for pi, name in enumerate(names):
        shape = report.param_shapes[name]
        if report.is_inert(name):        # every entry is its own generator: all fixed
            none = torch.full((1,) * len(shape), -1, dtype=torch.long)
            params[name] = ParamSkeleton(name, shape, none, none, torch.arange(shape.numel()),
                                         rel_col=none, rel_coef=torch.zeros_like(none))
            continue
        inp, out = report.sides(name)
        rel = report.relation_side(name)
        params[name] = ParamSkeleton(name, shape, inp, out, report.inert_entries(name),
                                     rel_col=rel.col, rel_coef=rel.coef)
        mixed.update(rel.mixed)
        if bool((inp >= 0).any() or (out >= 0).any()):
            grids[pi] = _Grid(weights[name].detach(), inp, out, n, rel.col)

    kinds = torch.tensor([g.kind == "rescale" for g in gens] + [False])
    done = torch.zeros(n + 1, dtype=torch.bool)
    done[n] = True                                             # column -1 (no class) maps to n
    rnd = torch.full((n,), -1, dtype=torch.long)
    f_param, f_cell = torch.full((n,), -1, dtype=torch.long), torch.zeros(n, dtype=torch.long)
    consumer, other = torch.zeros(n, dtype=torch.bool), torch.full((n,), -1, dtype=torch.long)
    live = dict(grids)
    # u[c] = log|M[c]| (M as in Skeleton.out_factor; u[n] = 0: no class), known once c is fixed:
    # fixing a consumer entry c -> o makes it log|w| + u[o] (t below), a producer entry a -> c
    # u[a] - log|w|. A group element g moves every candidate t of class c by the same g_c, so the
    # order of t among c's candidates of one side is a property of the orbit (DESIGN §3.4).
    u = torch.zeros(n + 1, dtype=torch.float64)
    r = 0
    while not bool(done[:n].all()):
        # preferences, in order: off the relation generators, then the class's preferred side
        for clean, strict in ((True, True), (True, False), (False, True), (False, False)):
            found = []           # (param, consumes, cells, their class, other class, t)
            for pi, g in list(live.items()):
                if bool(done[g.inp_classes].all() and done[g.out_classes].all()):
                    del live[pi]
                    continue
                for is_cons, cls, oth in ((True, g.inp, g.out), (False, g.out, g.inp)):
                    want, have = ~done[cls], done[oth]
                    if strict:
                        want &= kinds[cls] == is_cons
                    if not bool(want.any() and have.any()):
                        continue
                    cells = g.cells(want, have, g.clean) if clean else g.cells(want, have)
                    if cells.numel():
                        lw, o = g.logw(cells), g.at(oth, cells)
                        t = lw + u[o] if is_cons else u[o] - lw
                        found.append((pi, is_cons, cells, g.at(cls, cells), o, t))
            # one side per class (consumers when it has any: which side is eligible is structure),
            # then the entry of largest magnitude at the canonical point: consumers the largest t
            # (the largest product of fixed entries to the output), producers the smallest (the
            # largest |w| / M[source]). Rounded, so that rounding noise cannot reorder the
            # candidates of a rescaled copy: ties go to the first parameter, then the first entry.
            has_cons = torch.zeros(n + 1, dtype=torch.bool)
            for _, is_cons, _, c, _, _ in found:
                if is_cons:
                    has_cons[c] = True
            best = torch.full((n + 1,), NEG, dtype=torch.float64)
            b_param = torch.full((n + 1,), -1, dtype=torch.long)
            b_cell = torch.zeros(n + 1, dtype=torch.long)
            b_cons = torch.zeros(n + 1, dtype=torch.bool)
            b_other = torch.full((n + 1,), n, dtype=torch.long)
            b_t = torch.zeros(n + 1, dtype=torch.float64)
            for pi, is_cons, cells, c, oth, t in found:
                score = torch.round((t if is_cons else -t) * 1e9) / 1e9
                if not is_cons:
                    score = torch.where(has_cons[c], NEG, score)
                top, pos = _best_per_class(c, score, n)
                take = ((top > best) & (top > NEG)).nonzero().reshape(-1)
                k = pos[take]
                best[take], b_param[take], b_cell[take] = top[take], pi, cells[k]
                b_cons[take], b_other[take], b_t[take] = is_cons, oth[k], t[k]
            chosen = (b_param[:n] >= 0).nonzero().reshape(-1)
            if chosen.numel():
                f_param[chosen], f_cell[chosen] = b_param[chosen], b_cell[chosen]
                consumer[chosen], other[chosen] = b_cons[chosen], b_other[chosen]
                u[chosen] = b_t[chosen]
                rnd[chosen] = r
                done[chosen] = True
                r += 1
                break
        else:
            stuck = [gens[k] for k in (~done[:n]).nonzero().reshape(-1)[:3].tolist()]
            raise RuntimeError(
                f"skeleton: no entry can be fixed for {int((~done[:n]).sum())} generator(s), e.g. "
                f"{stuck}: every candidate entry is zero or non-finite. Re-initialise those weights "
                f"(or perturb them) and compile again.")

    f_entry = torch.zeros(n, dtype=torch.long)
    for pi in f_param.unique().tolist():
        sel = f_param == pi
        f_entry[sel] = _cell_to_entry(f_cell[sel], grids[pi].grid, params[names[pi]].shape)
        ps = params[names[pi]]
        ps.fixed_idx = torch.cat([f_entry[sel], ps.fixed_idx]).sort().values   # + its inert entries
    other = torch.where(other >= n, -1, other)
    sk = Skeleton(n, names, params, f_param, f_entry, consumer, other, rnd,
                  torch.full((n,), -1, dtype=torch.long), torch.zeros(n, dtype=torch.long),
                  torch.full((n,), -1, dtype=torch.long), torch.full((n,), -1, dtype=torch.long),
                  torch.zeros(n, dtype=torch.bool))
    if carriers:
        _carriers(sk, grids, report.additive, weights)
    _relations(sk, report, weights, mixed)
    return sk


def _carriers(sk: Skeleton, grids, additive: set, weights: dict) -> None:
    """Choose J in rounds from the input: a class gets a producer entry whose source is the input or
    a class resolved earlier: the fixed entry entering it if there is one (its value is a constant),
    else the free one that gives the largest |P_in| = |w|·|P_in(source)| (it is divided by). A
    group element moves all candidates of a class by the same factor, so the choice is the orbit's
    (scores rounded as in the peeling; ties to the first parameter and entry). Additive parameters
    (biases, β) read the constant 1 and so would always be first, but they are small (often 0):
    they carry only when nothing else can.
    Classes left over (no producer, or cycles) get no carrier: P_in = 1/M, a constant."""
    n = sk.num_classes
    resolved = torch.zeros(n + 1, dtype=torch.bool)
    resolved[n] = True
    enters = torch.where(sk.consumer & (sk.other >= 0), sk.other, n)   # class each K entry enters
    usable = {}                                              # per grid: cells that may carry
    for pi, g in grids.items():
        p = sk.params[sk.names[pi]]
        mask = torch.zeros(p.shape.numel(), dtype=torch.bool)
        mask[p.fixed_idx] = True
        usable[pi] = ~mask.view(p.shape)[_centre(p.shape, g.grid)].expand(g.grid)
    # stages: off the relation generators without biases, with biases, then anywhere
    stage = 0
    log_p = torch.zeros(n + 1, dtype=torch.float64)          # log|P_in| of resolved classes (n: input)
    r = 0
    while True:
        # fixed entries entering an unresolved class from a resolved one
        src = torch.arange(n)
        cand = (enters < n) & resolved[:n] & ~resolved[enters]
        chosen_k = torch.zeros(n + 1, dtype=torch.bool)
        if bool(cand.any()):
            c, a = enters[cand], src[cand]
            first = torch.full((n + 1,), n, dtype=torch.long).scatter_reduce(0, c, a, "amin")
            cls = (first[:n] < n).nonzero().reshape(-1)
            a = first[cls]
            sk.carrier_param[cls], sk.carrier_entry[cls] = sk.fixed_param[a], sk.fixed_entry[a]
            sk.carrier_src[cls], sk.carrier_fixed[cls], sk.carrier_round[cls] = a, True, r
            chosen_k[cls] = True
            log_p[cls] = sk._values(weights, sk.fixed_param[a], sk.fixed_entry[a]).abs().log() + log_p[a]
        best = torch.full((n + 1,), NEG, dtype=torch.float64)
        b_param = torch.full((n + 1,), -1, dtype=torch.long)
        b_cell = torch.zeros(n + 1, dtype=torch.long)
        for pi, g in grids.items():
            if sk.names[pi] in additive and stage == 0:
                continue
            want, have = ~resolved[g.out] & ~chosen_k[g.out], resolved[g.inp]
            if not bool(want.any() and have.any()):
                continue
            cells = g.cells(want, have, usable[pi], g.clean) if stage < 2 else g.cells(want, have, usable[pi])
            if cells.numel() == 0:
                continue
            score = torch.round((g.logw(cells) + log_p[g.at(g.inp, cells)]) * 1e9) / 1e9
            top, pos = _best_per_class(g.at(g.out, cells), score, n)
            take = (top > best).nonzero().reshape(-1)
            best[take], b_param[take], b_cell[take] = top[take], pi, cells[pos[take]]
        chosen = (b_param[:n] >= 0).nonzero().reshape(-1)
        for pi in b_param[chosen].unique().tolist():
            sel = chosen[b_param[chosen] == pi]
            g = grids[pi]
            sk.carrier_param[sel] = pi
            sk.carrier_entry[sel] = _cell_to_entry(b_cell[sel], g.grid, sk.params[sk.names[pi]].shape)
            src_cls = g.at(g.inp, b_cell[sel])
            sk.carrier_src[sel] = torch.where(src_cls >= n, -1, src_cls)
            log_p[sel] = g.logw(b_cell[sel]) + log_p[src_cls]
        sk.carrier_round[chosen] = r
        if chosen.numel() == 0 and not bool(chosen_k.any()):
            if stage == 2:
                break
            stage += 1                              # no progress: let biases, then any entry carry
            continue
        stage = 0
        resolved[chosen] = True
        resolved[:n] |= chosen_k[:n]
        r += 1
    free = (sk.carrier_param >= 0) & ~sk.carrier_fixed
    for pi in sk.carrier_param[free].unique().tolist():
        sel = (free & (sk.carrier_param == pi)).nonzero().reshape(-1)
        p = sk.params[sk.names[pi]]
        p.carrier_idx, p.carrier_cls = sk.carrier_entry[sel], sel


def _relations(sk: Skeleton, report, weights: dict, mixed: set) -> None:
    """One fixed entry per relation generator (DESIGN §3.6c): an entry on it alone, whose
    invariant coordinate V_e = w_e·P_in[in]·M[out] is held constant (the gspace form) or whose
    weight is (the fixed form). Only where no K or J entry lies on the generator: then P_in and M do
    not move with it, V moves as w does, and E_K stays block-triangular with ±1 on its diagonal.
    Candidates: a weight entry of exponent +1 if there is one, else of -1, else a bias; the largest
    |V_e| (a group element moves every candidate of one tier by the same factor: the orbit's
    choice, rounded as in the peeling, ties to the first parameter and entry)."""
    R = report.num_relations
    sk.relation_param = torch.full((R,), -1, dtype=torch.long)
    sk.relation_entry = torch.full((R,), -1, dtype=torch.long)
    if R == 0:
        return
    blocked = torch.zeros(R + 1, dtype=torch.bool)
    blocked[sorted(mixed)] = True
    on = {}
    for pi, name in enumerate(sk.names):
        ps = sk.params[name]
        if not bool((ps.rel_col >= 0).any()):
            continue
        col = ps.rel_col.expand(ps.shape).reshape(-1)
        taken = torch.cat([ps.fixed_idx, ps.carrier_idx])
        hit = col[taken]
        blocked[hit[hit >= 0]] = True
        on[pi] = (col, taken)
    log_m = sk.out_factor(weights).abs().log()
    log_p = sk.in_factor(weights, sk.out_factor(weights)).abs().log()
    n = sk.num_classes
    best = torch.full((R + 1,), NEG, dtype=torch.float64)
    for pi, (col, taken) in on.items():
        name = sk.names[pi]
        ps = sk.params[name]
        w = weights[name].detach().reshape(-1).to(torch.float64)
        coef = ps.rel_coef.expand(ps.shape).reshape(-1)
        inp = torch.where(ps.inp < 0, n, ps.inp).expand(ps.shape).reshape(-1)
        out = torch.where(ps.out < 0, n, ps.out).expand(ps.shape).reshape(-1)
        ok = (col >= 0) & (w != 0) & torch.isfinite(w)
        ok[taken] = False
        ok[report.inert_entries(name)] = False
        ok &= ~blocked[torch.where(col >= 0, col, R)]
        cells = ok.nonzero().reshape(-1)
        if not cells.numel():
            continue
        log_v = w[cells].abs().log() + log_p[inp[cells]] + log_m[out[cells]]
        tier = 2.0 * (coef[cells] > 0) + (len(ps.shape) >= 2 and name not in report.additive)
        score = tier * 1e4 + torch.round(log_v * 1e9) / 1e9
        top, pos = _best_per_class(col[cells], score, R)
        take = (top > best).nonzero().reshape(-1)
        best[take] = top[take]
        sk.relation_param[take], sk.relation_entry[take] = pi, cells[pos[take]]
    sk._place_relations()
