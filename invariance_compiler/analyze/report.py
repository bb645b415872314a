"""SymmetryReport: the rescaling group the analysis found, in the user's terms (parameters, layers).

Generators are stored implicitly: every parameter keeps its factors (sign, class labels, compact),
and every label its generator coefficients, so E is never materialised unless asked for (ResNet-50
has ~25M rows). Most labels are one generator each (column `_col[label]`, coefficient 1); labels
tied by the exponent algebra's relations (attention's query/key pairs) take their coefficients from
the relations' null space (`_multi`). Inert entries are blocks per parameter, one column each."""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn

from .algebra import solve_relations
from .context import UNSET, Context
from .value import PIN, Value

__all__ = ["SymmetryReport", "Generator", "RelationSide"]

KINDS = ("rescale", "normalize", "inert")


@dataclass
class RelationSide:
    """What the relation generators do to one parameter (`SymmetryReport.relation_side`), compact
    (broadcastable to the parameter): `col`, the relation generator of each entry counted from
    num_simple (-1: none); `coef`, that entry's exponent on it (±1); `mixed`, the relation
    generators that cannot be quotiented through this parameter's entries."""
    col: torch.Tensor
    coef: torch.Tensor
    mixed: set


@dataclass
class Generator:
    """One column of E: a direction λ_c that leaves the function unchanged."""
    index: int
    kind: str                      # "rescale" | "normalize" | "inert"
    params: tuple[str, ...]        # parameters with non-zero entries
    _report: "SymmetryReport"
    _entry: Optional[tuple[str, int]] = None   # (parameter, flat index) for inert

    def entries(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """{parameter name: (flat entry indices, coefficients)}, coefficients ±1 nearly always."""
        if self._entry is not None:
            name, i = self._entry
            return {name: (torch.tensor([i]), torch.tensor([1]))}
        out = {}
        for name in self.params:
            col = self._report._column_values(name, self.index).reshape(-1)
            idx = col.nonzero().reshape(-1)
            out[name] = (idx, col[idx])
        return out

    def __repr__(self):
        return f"Generator({self.index}, {self.kind}, params={list(self.params)})"


class _Generators(Sequence):
    """The generators as objects, made on demand: class generators from (kind, parameters), inert
    ones from their blocks (a model can have tens of thousands of classes, millions of inert
    entries)."""

    def __init__(self, report, classes: list[tuple[str, tuple]]):
        self._report, self._info = report, classes

    @property
    def _classes(self) -> list[Generator]:
        return [Generator(k, kind, params, self._report) for k, (kind, params) in enumerate(self._info)]

    def __len__(self):
        return len(self._info) + self._report._num_inert

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if i < len(self._info):
            kind, params = self._info[i]
            return Generator(i, kind, params, self._report)
        if not 0 <= i < len(self):
            raise IndexError(i)
        name, entry = self._report._inert_entry(i)
        return Generator(i, "inert", (name,), self._report, _entry=(name, entry))


class SymmetryReport:
    def __init__(self, model: nn.Module, captured, ctx: Context, unknown: list[tuple[str, str]],
                 inert: dict[str, torch.Tensor], read: set[str]):
        self.captured = captured               # the torch.export capture (trace.Captured)
        self.graph = captured.gm               # its graph, with the analysis in node.meta
        self.param_names = [n for n, _ in model.named_parameters()]
        self.param_shapes = {n: p.shape for n, p in model.named_parameters()}
        self.layer_types = {n: _layer_type(model, n) for n in self.param_names}
        self.pins = list(ctx.pins)
        self.unknown_ops = list(unknown)
        self.notes = list(dict.fromkeys(ctx.notes))
        self.additive = set(ctx.additive)      # parameters added to an output (biases, β)
        self.read = set(read)                  # parameters some node of the graph reads
        self.num_params = sum(p.numel() for p in model.parameters())
        labels = ctx.classes.solve()
        self._labels = labels

        # Inert entries: unread parameters, entries proven inert, rules' proofs (PReLU slopes).
        self._inert: dict[str, torch.Tensor] = {}
        for name in self.param_names:
            entries = inert.get(name)
            if name in ctx.inert:
                extra = ctx.inert[name]
                entries = extra if entries is None else torch.cat([entries, extra]).unique()
            if name not in read and name not in ctx.bindings:
                entries = torch.arange(self.param_shapes[name].numel())
            if entries is not None and entries.numel():
                self._inert[name] = entries.sort().values

        # Final factors per parameter, in labels (UNSET entries of a partly used parameter pin).
        self._factors: dict[str, list[tuple[int, torch.Tensor]]] = {}
        for name in self.param_names:
            b = ctx.bindings.get(name)
            if b is None or self._all_inert(name):
                continue
            factors = []
            for s, c in b.factors:
                lab = _relabel(labels, torch.where(c == UNSET, PIN, c))
                if name in self._inert:
                    full = lab.expand(self.param_shapes[name]).reshape(-1).clone()
                    full[self._inert[name]] = PIN
                    lab = full.view(self.param_shapes[name])
                factors.append((s, lab))
            self._factors[name] = factors

        visible = set()
        for factors in self._factors.values():
            for _, lab in factors:
                visible.update(lab[lab > PIN].unique().tolist())
        constrained, basis = solve_relations(ctx.classes.relations, labels, visible)

        self._col = torch.full((len(labels),), -1, dtype=torch.long)
        self._multi: dict[int, list[tuple[int, int]]] = {}
        # one column per label outside the relations (vectorised: ResNet-50 has 38k), then one per
        # null-space vector of the relations
        singles = torch.tensor(sorted(visible - constrained), dtype=torch.long)
        self._col[singles] = torch.arange(singles.numel())
        columns: list = [None] * singles.numel() + list(basis)
        counts = defaultdict(int)
        for vec in basis:
            for lab in vec:
                counts[lab] += 1
        self._simple: list[bool] = [True] * singles.numel()
        for c, vec in enumerate(basis, start=singles.numel()):
            simple = all(v == 1 and counts[lab] == 1 for lab, v in vec.items())
            self._simple.append(simple)
            for lab, v in vec.items():
                if simple:
                    self._col[lab] = c
                else:
                    self._multi.setdefault(lab, []).append((c, v))
        # relation columns as padded tables over labels: label l has coefficient _mval[k, l] on
        # column _mcol[k, l] (-1: none), k < the most columns any label has (1 or 2 in practice)
        depth = max((len(c) for c in self._multi.values()), default=0)
        self._mcol = torch.full((depth, len(labels)), -1, dtype=torch.long)
        self._mval = torch.zeros((depth, len(labels)), dtype=torch.long)
        for lab, cols in self._multi.items():
            for k, (c, v) in enumerate(cols):
                self._mcol[k, lab], self._mval[k, lab] = c, v
        self._multi = bool(self._multi)

        # Kind and parameters of each class generator, from the signs its entries take.
        plus, minus = defaultdict(set), defaultdict(set)
        for i, name in enumerate(self.param_names):
            if name not in self._factors:
                continue
            for col, sign in self._column_signs(name):
                (plus if sign > 0 else minus)[col].add(i)
        classes = []
        for c in range(len(columns)):
            used = plus.get(c, set()) | minus.get(c, set())
            if not used:
                continue           # a direction no parameter sees (cancelled): not a generator
            kind = "rescale" if c in minus else "normalize"
            classes.append((c, kind, tuple(self.param_names[i] for i in sorted(used))))
        # plain classes first: the skeleton removes columns [0, num_simple)
        classes.sort(key=lambda t: not self._simple[t[0]])
        self.num_simple = sum(self._simple[c] for c, _, _ in classes)
        # renumber: drop columns that no entry sees
        remap = torch.full((len(columns) + 1,), -1, dtype=torch.long)
        for new, (c, _, _) in enumerate(classes):
            remap[c] = new
        self._col = torch.where(self._col >= 0, remap[self._col], -1)
        self._mcol = torch.where(self._mcol >= 0, remap[self._mcol], -1)
        self._mval = torch.where(self._mcol >= 0, self._mval, 0)
        self._simple = [self._simple[c] for c, _, _ in classes]
        self._inert_start = len(classes)
        self._inert_names = [n for n in self.param_names if n in self._inert]
        self._inert_offsets = {}
        off = self._inert_start
        for n in self._inert_names:
            self._inert_offsets[n] = off
            off += self._inert[n].numel()
        self._num_inert = off - self._inert_start
        self.generators = _Generators(self, [(kind, params) for _, kind, params in classes])
        self._annotate_graph()

    def __getstate__(self):
        # the exported graph (and what captured it) does not pickle; everything E needs does
        return {k: (None if k in ("graph", "captured") else v) for k, v in self.__dict__.items()}

    # ---- internals ------------------------------------------------------------------------------
    def _all_inert(self, name) -> bool:
        e = self._inert.get(name)
        return e is not None and e.numel() == self.param_shapes[name].numel()

    def _column_signs(self, name):
        """(column, sign) pairs that some entry of `name` has (before renumbering)."""
        factors = self._factors[name]
        # Within one factor an entry's label has distinct columns, so terms cancel only where two
        # factors share a column; when none do, the pairs are read off each factor's labels.
        per_factor = []
        for s, lab in factors:
            terms = self._terms(lab.unique())
            cols = torch.cat([c for c, _ in terms])
            vals = torch.cat([v for _, v in terms]) * s
            keep = (cols >= 0) & (vals != 0)
            per_factor.append((cols[keep], vals[keep].sign()))
        seen = [c.unique() for c, _ in per_factor]
        if not any(bool(torch.isin(seen[i], seen[j]).any())
                   for i in range(len(seen)) for j in range(i + 1, len(seen))):
            keys = torch.cat([c * 3 + v + 1 for c, v in per_factor] + [torch.zeros(0, dtype=torch.long)]).unique()
            return {(int(k // 3), int(k % 3) - 1) for k in keys.tolist()}
        if not self._touches_multi(name) and len(factors) <= 2:
            # fast path: simple columns only; a +c and -c on one entry cancel
            labs = [lab for _, lab in factors]
            uniq = [self._col[l.unique()] for l in labs]
            if len(factors) == 2 and bool(torch.isin(uniq[0][uniq[0] >= 0], uniq[1][uniq[1] >= 0]).any()):
                a, b = torch.broadcast_tensors(self._col[labs[0]], self._col[labs[1]])
                diff = a != b
                uniq = [a[diff].unique(), b[diff].unique()]
            out = set()
            for (s, _), u in zip(factors, uniq):
                out.update((c, s) for c in u[u >= 0].tolist())
            return out
        _, cols, vals = self._triplets(name)
        keys = (cols * 3 + vals.sign() + 1).unique()          # 1-D unique: unique(dim=0) is slow
        return {(int(k // 3), int(k % 3) - 1) for k in keys.tolist()}

    def _touches_multi(self, name) -> bool:
        if not self._multi:
            return False
        return any(bool((self._mcol[:, lab.reshape(-1)] >= 0).any()) for _, lab in self._factors.get(name, []))

    def _terms(self, lab):
        """[(columns, coefficients)] over lab's shape: its simple column, then its relation columns."""
        out = [(self._col[lab], torch.ones_like(lab))]
        for k in range(self._mcol.shape[0]):
            out.append((self._mcol[k][lab], self._mval[k][lab]))
        return out

    def _triplets(self, name, rows: Optional[slice] = None):
        """(entries, columns, coefficients) of the non-zero exponents of `name` (of its dim-0 slice
        `rows`, entries counted from the slice's start), coalesced: sorted by entry, then column
        (inert entries excluded)."""
        shape = self.param_shapes[name]
        ents, cols, vals = [], [], []
        for s, lab in self._factors.get(name, []):
            full = _rows(lab.expand(shape), rows).reshape(-1)
            for col, val in self._terms(full):
                keep = (col >= 0) & (val != 0)
                ents.append(keep.nonzero().reshape(-1))
                cols.append(col[keep])
                vals.append(s * val[keep])
        if not ents:
            z = torch.zeros(0, dtype=torch.long)
            return z, z, z
        e, c, v = torch.cat(ents), torch.cat(cols), torch.cat(vals)
        width = int(c.max()) + 1 if c.numel() else 1
        key, inv = (e * width + c).unique(return_inverse=True)
        total = torch.zeros(key.numel(), dtype=torch.long).index_add_(0, inv, v)
        keep = total != 0
        key, total = key[keep], total[keep]
        return key // width, key % width, total

    def _column_values(self, name, col) -> torch.Tensor:
        out = torch.zeros(self.param_shapes[name].numel(), dtype=torch.long)
        e, c, v = self._triplets(name)
        hit = c == col
        out[e[hit]] = v[hit]
        return out.view(self.param_shapes[name])

    def _inert_entry(self, i):
        for n in self._inert_names:
            off = self._inert_offsets[n]
            if off <= i < off + self._inert[n].numel():
                return n, int(self._inert[n][i - off])
        raise IndexError(i)

    def _label_values(self, lam: torch.Tensor) -> torch.Tensor:
        """μ = B λ: the log-scale of every label."""
        lam_ext = torch.cat([lam, lam.new_zeros(1)])            # column -1 -> 0
        mu = lam_ext[self._col]
        for k in range(self._mcol.shape[0]):
            mu = mu + self._mval[k].to(lam.dtype) * lam_ext[self._mcol[k]]
        return mu

    # ---- the contract -----------------------------------------------------------------------
    @property
    def num_generators(self) -> int:
        return len(self.generators)

    @property
    def invariant_ratio(self) -> float:
        return self.num_generators / self.num_params if self.num_params else 0.0

    def counts(self) -> dict[str, int]:
        out = dict.fromkeys(KINDS, 0)
        for kind, _ in self.generators._info:
            out[kind] += 1
        out["inert"] = self._num_inert
        return out

    def exponents(self, name: str, log_scales: torch.Tensor, _mu: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(E λ) restricted to parameter `name`, in its shape."""
        shape = self.param_shapes[name]
        lam = log_scales.reshape(-1)
        mu = self._label_values(lam) if _mu is None else _mu
        out = lam.new_zeros(shape)
        for s, lab in self._factors.get(name, []):
            out = out + s * mu[lab]
        if name in self._inert:
            idx = self._inert[name]
            off = self._inert_offsets[name]
            out = out.reshape(-1).clone()
            out[idx] = lam[off: off + idx.numel()]
            out = out.view(shape)
        return out

    def generator_matrix(self, dtype=torch.float32, sparse: bool = False) -> torch.Tensor:
        """E: (m, H), small integers (±1 nearly everywhere), rows in model.parameters() order. The
        sparse form is built coalesced in O(nnz): each parameter in slices of its rows, each slice
        already sorted and written straight into the result, which is allocated for a bound on
        the non-zeros (the pages of an unused tail are never touched) and returned as a view."""
        m, h = self.num_params, self.num_generators
        if not sparse and m * h > 2 ** 28:
            raise MemoryError(f"E would be a dense {m} x {h} matrix; use generator_matrix(sparse=True)")
        bound = sum(self.param_shapes[n].numel() * self._terms_per_entry(n) for n in self.param_names)
        idx, val = torch.empty(2, bound, dtype=torch.long), torch.empty(bound, dtype=dtype)
        at, offset = 0, 0
        for name in self.param_names:
            for start, rows in _row_slices(self.param_shapes[name]):
                r, c, v = self._param_block(name, dtype, rows)
                n = r.numel()
                torch.add(r, offset + start, out=idx[0, at: at + n])
                idx[1, at: at + n] = c
                val[at: at + n] = v
                at += n
            offset += self.param_shapes[name].numel()
        E = torch.sparse_coo_tensor(idx[:, :at], val[:at], (m, h), is_coalesced=True, check_invariants=False)
        return E if sparse else E.to_dense()

    def _general(self, name) -> bool:
        """Whether `name`'s rows of E need the general path (relations, some inert entries, more
        than two factors) rather than one or two ±1 columns an entry."""
        return ((name in self._inert and not self._all_inert(name)) or self._touches_multi(name)
                or len(self._factors.get(name, [])) > 2)

    def _terms_per_entry(self, name) -> int:
        """A bound on the non-zeros of one row of E that belongs to `name`."""
        if self._all_inert(name):
            return 1
        factors = self._factors.get(name, [])
        if self._general(name):
            return len(factors) * (1 + self._mcol.shape[0]) + (name in self._inert)
        return len(factors)

    def _param_block(self, name, dtype, rows: Optional[slice] = None):
        """(entries, columns, values) of one parameter's rows of E (of its dim-0 slice `rows`,
        entries counted from the slice's start), sorted by entry then column."""
        shape = self.param_shapes[name]
        factors = self._factors.get(name, [])
        start, numel = 0, shape.numel()
        if rows is not None:                        # _row_slices' slices: explicit start and stop
            inner = numel // shape[0]
            start, numel = rows.start * inner, (rows.stop - rows.start) * inner
        if self._general(name):
            e, c, v = self._triplets(name, rows)
            if name in self._inert:
                idx = self._inert[name]
                mine = ((idx >= start) & (idx < start + numel)).nonzero().reshape(-1)
                e = torch.cat([e, idx[mine] - start])
                c = torch.cat([c, self._inert_offsets[name] + mine])
                v = torch.cat([v, torch.ones(mine.numel(), dtype=torch.long)])
                order = (e * (self.num_generators + 1) + c).argsort()
                e, c, v = e[order], c[order], v[order]
            return e, c, v.to(dtype)
        if self._all_inert(name):
            return (torch.arange(numel), self._inert_offsets[name] + start + torch.arange(numel),
                    torch.ones(numel, dtype=dtype))
        if not factors:
            return (torch.zeros(0, dtype=torch.long),) * 2 + (torch.zeros(0, dtype=dtype),)
        cs = [_rows(self._col[lab].expand(shape), rows).reshape(-1) for _, lab in factors]
        ss = [s for s, _ in factors]
        if len(cs) == 1:
            keep = (cs[0] >= 0).nonzero().reshape(-1)
            return keep, cs[0][keep], torch.full((keep.numel(),), float(ss[0]), dtype=dtype)
        (c1, c2), (s1, s2) = cs, ss
        same = c1 == c2
        lo = torch.where(c1 <= c2, c1, c2)
        hi = torch.where(c1 <= c2, c2, c1)
        slo = torch.where(c1 <= c2, s1, s2)
        shi = torch.where(c1 <= c2, s2, s1)
        pair_c = torch.stack([lo, hi], dim=1)
        pair_v = torch.stack([torch.where(same, s1 + s2, slo), shi], dim=1).to(dtype)
        valid = torch.stack([lo >= 0, (hi >= 0) & ~same], dim=1) & (pair_v != 0)
        if bool(valid.all()):               # a producer and a consumer class on every entry (a weight)
            return torch.arange(2 * c1.numel()) // 2, pair_c.reshape(-1), pair_v.reshape(-1)
        flat = valid.reshape(-1).nonzero().reshape(-1)
        return flat // 2, pair_c.reshape(-1)[flat], pair_v.reshape(-1)[flat]

    @torch.no_grad()
    def act(self, model: nn.Module, log_scales: torch.Tensor) -> nn.Module:
        """θ ← θ ⊙ exp(E λ), in place; the function is unchanged. Returns the model."""
        log_scales = torch.as_tensor(log_scales, dtype=torch.float64).reshape(-1)
        if log_scales.numel() != self.num_generators:
            raise ValueError(f"act: expected {self.num_generators} log-scales (one per generator), "
                             f"got {log_scales.numel()}")
        params = dict(model.named_parameters())
        missing = [n for n in self.param_names if n not in params]
        if missing:
            raise ValueError(f"act: the model lacks parameters {missing[:3]}; pass the model this "
                             f"report was built from (or one of the same architecture)")
        mu = self._label_values(log_scales)
        for name in self.param_names:
            p = params[name]
            if p.is_floating_point():
                p.mul_(self.exponents(name, log_scales, mu).exp().to(p.dtype))
        return model

    def sides(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(in, out): the simple generator column each entry of `name` consumes (-1 factor) and
        produces (+1 factor), compact (broadcastable to the parameter); -1 where there is none. An
        entry whose two sides are one class (exponent 0) gets -1 on both. Columns from the exponent
        algebra's relations (attention's query/key pairs) are not sides: the skeleton leaves them.
        Inert entries: -1."""
        shape = self.param_shapes[name]
        nd = len(shape)
        none = torch.full((1,) * nd, -1, dtype=torch.long)
        side = {+1: none, -1: none}
        for s, lab in self._factors.get(name, []):
            col = self._col[lab]
            side[s] = col if side[s] is none else torch.where(col >= 0, col, side[s])
        out, inp = side[+1], side[-1]
        if bool(((out == inp) & (out >= 0)).any()):
            same = out == inp
            inp, out = torch.where(same, -1, inp), torch.where(same, -1, out)
        return inp, out

    @property
    def num_relations(self) -> int:
        """Class generators from the exponent algebra's relations (attention's query/key pairs, a
        LayerNorm-read residual stream): columns [num_simple, num_simple + num_relations)."""
        return self._inert_start - self.num_simple

    def relation_side(self, name: str) -> "RelationSide":
        """The relation generator each entry of `name` has a non-zero exponent on, counted from
        num_simple (-1: none), and that exponent, compact. `mixed` lists the relation generators
        that some entry shares with another one or has with an exponent other than ±1: the
        skeleton leaves those in the coordinates."""
        shape = self.param_shapes[name]
        col = torch.full((1,) * len(shape), -1, dtype=torch.long)
        coef = torch.zeros_like(col)
        mixed: set[int] = set()
        if not self._touches_multi(name):
            return RelationSide(col, coef, mixed)
        for s, lab in self._factors[name]:
            for k in range(self._mcol.shape[0]):
                c, v = self._mcol[k][lab], s * self._mval[k][lab]
                if not bool((c >= 0).any()):
                    continue
                col, coef, c, v = (t.clone() for t in torch.broadcast_tensors(col, coef, c, v))
                term = (c >= 0) & (v != 0)
                clash = term & (col >= 0) & (col != c)
                mixed.update(col[clash].tolist() + c[clash].tolist())
                coef = torch.where(term & (col == c), coef + v, torch.where(term & (col < 0), v, coef))
                col = torch.where(term & (col < 0), c, col)
        col = torch.where(coef != 0, col, -1)
        mixed.update(col[coef.abs() > 1].tolist())
        return RelationSide(col - torch.where(col >= 0, self.num_simple, 0), coef.clamp(-1, 1),
                            {c - self.num_simple for c in mixed if c >= 0})

    def has_classes(self, name: str) -> bool:
        """Whether parameter `name` is bound to classes (read by some op whose rule scales it)."""
        return name in self._factors

    @property
    def simple_kinds(self) -> list[str]:
        """The kind of each plain class generator (columns 0 .. num_simple - 1): "rescale" (producers
        and consumers) or "normalize" (producers only: a normaliser absorbs the scale)."""
        return [kind for kind, _ in self.generators._info[: self.num_simple]]

    def is_inert(self, name: str) -> bool:
        """Every entry of `name` is inert."""
        return self._all_inert(name)

    def inert_entries(self, name: str) -> torch.Tensor:
        """Flat indices of the inert entries of `name` (empty when none)."""
        return self._inert.get(name, torch.zeros(0, dtype=torch.long))

    def is_simple(self, col: int) -> bool:
        """Whether class generator `col` is a plain class (+1 on what produces it, -1 on what
        consumes it); the skeleton removes exactly these, columns [0, num_simple)."""
        return col < self.num_simple

    @property
    def class_generators(self) -> list[Generator]:
        """The rescale and normalize generators (columns [0, H - inert))."""
        return list(self.generators._classes)

    # ---- inspection -------------------------------------------------------------------------
    def _annotate_graph(self):
        """node.meta["ic_generators"]: generator index per element (compact), -1 where no simple scale."""
        if self.graph is None:
            return
        for node in self.graph.graph.nodes:
            v = node.meta.get("ic_value")
            if isinstance(v, Value) and v.ids is not None:
                node.meta["ic_generators"] = self.generator_of_ids(v.ids)

    def generator_of_ids(self, ids: torch.Tensor) -> torch.Tensor:
        lab = self._labels[ids.clamp(min=0)]
        return torch.where(ids > PIN, self._col[lab], -1)

    def layers(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for n in self.param_names:
            out.setdefault(_layer_of(n), []).append(n)
        return out

    def __str__(self) -> str:
        return _format(self)

    def __repr__(self):
        c = self.counts()
        return (f"SymmetryReport(m={self.num_params}, H={self.num_generators}: {c['rescale']} rescale, "
                f"{c['normalize']} normalize, {c['inert']} inert)")

    def to_networkx(self):
        from .graphs import to_networkx
        return to_networkx(self)

    def to_dot(self) -> str:
        from .graphs import to_dot
        return to_dot(self)

    def structure_matrix(self, max_paths: int = 100_000) -> torch.Tensor:
        from .paths import structure_matrix
        return structure_matrix(self, max_paths)


def _rows(t: torch.Tensor, rows: Optional[slice]) -> torch.Tensor:
    return t if rows is None else t[rows]


ROW_CHUNK = 1 << 21   # entries of one piece of a parameter when E is built (tests make it tiny)


def _row_slices(shape: torch.Size):
    """(first flat entry, dim-0 slice) covering a tensor of `shape` in pieces of about ROW_CHUNK
    entries, so that E's temporaries for one piece stay small."""
    chunk = ROW_CHUNK
    if len(shape) == 0 or shape.numel() <= chunk:
        yield 0, None
        return
    inner = shape.numel() // shape[0]
    step = max(1, chunk // inner)
    for r0 in range(0, shape[0], step):
        yield r0 * inner, slice(r0, min(r0 + step, shape[0]))


def _relabel(labels: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return torch.where(ids > PIN, labels[ids.clamp(min=0)], PIN)


def _layer_of(param_name: str) -> str:
    return param_name.rsplit(".", 1)[0] if "." in param_name else param_name


def _layer_type(model, param_name):
    layer = _layer_of(param_name)
    if layer == param_name:
        return "Parameter"
    return type(model.get_submodule(layer)).__name__


def _format(r: SymmetryReport) -> str:
    per = defaultdict(lambda: dict.fromkeys(KINDS, 0))
    shared = defaultdict(int)
    for g in r.generators._classes:
        home = _layer_of(g.params[0]) if g.params else "?"
        per[home][g.kind] += 1
        if len({_layer_of(p) for p in g.params}) > 2:
            shared[home] += 1
    for n in r._inert_names:
        per[_layer_of(n)]["inert"] += r._inert[n].numel()
    rows = [("layer", "type", "params", "rescale", "normalize", "inert", "note")]
    for layer, names in r.layers().items():
        n = sum(r.param_shapes[p].numel() for p in names)
        c = per[layer]
        note = f"{shared[layer]} spanning >2 layers" if shared[layer] else ""
        rows.append((layer, r.layer_types[names[0]], str(n), str(c["rescale"]), str(c["normalize"]),
                     str(c["inert"]), note))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) if i < 2 or i == 6 else cell.rjust(w)
                       for i, (cell, w) in enumerate(zip(row, widths))).rstrip() for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    c = r.counts()
    lines += ["", f"m = {r.num_params} parameters, H = {r.num_generators} generators "
                  f"({c['rescale']} rescale, {c['normalize']} normalize, {c['inert']} inert), "
                  f"invariant ratio H/m = {r.invariant_ratio:.4f}"]
    reasons = defaultdict(list)
    for node, why in r.pins:
        reasons[why].append(node)
    if reasons:
        lines.append("pinned (scale fixed to 1):")
        for why, nodes in reasons.items():
            more = f" (+{len(nodes) - 4} more)" if len(nodes) > 4 else ""
            lines.append(f"  {why}: {', '.join(nodes[:4])}{more}")
    if r.unknown_ops:
        lines.append("ops without a rule (pinned): " + ", ".join(sorted({op for op, _ in r.unknown_ops})))
    for note in r.notes:
        lines.append(f"note: {note}")
    return "\n".join(lines)
