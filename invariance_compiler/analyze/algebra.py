"""The exponent algebra's linear part (DESIGN §3.2): relations Σ coeff · λ(label) = 0 between class
labels, solved exactly in rationals.

After the unions every class is a label; most labels take part in no relation and are one generator
each. The rest form connected components (one per attention head; one per residual stream, whose
norms tie all its channels): for each, the null space of its relations, restricted to the labels
that parameters see, is a set of generators with small integer coefficients (sparse elimination
over Fractions, then the reduced row echelon form scaled to integers)."""
from __future__ import annotations

import math
from collections import defaultdict
from fractions import Fraction

import torch

from .value import PIN

__all__ = ["solve_relations"]


def solve_relations(relations, labels: torch.Tensor, visible: set[int]):
    """relations: (ids (rows, terms), coeffs) batches from ClassTable; labels: class id -> label;
    visible: labels that parameter entries carry.
    Returns (constrained: every label in a relation, basis: list of {label: int coeff}); a visible
    constrained label that no basis vector names is forced to 0."""
    if not relations:
        return set(), []
    eqs = []
    for ids, coeffs in relations:
        lab = torch.where(ids > PIN, labels[ids.clamp(min=0)], PIN)
        lab = lab.unique(dim=0) if lab.shape[0] > 1 else lab          # rows that the unions made equal
        for row in lab.tolist():
            e = {l: c for l, c in zip(row, coeffs) if l > PIN and c}
            if len(e) < sum(l > PIN for l in row):         # a label twice (or a 0): add them up
                e = defaultdict(Fraction)
                for l, c in zip(row, coeffs):
                    if l > PIN:
                        e[l] += c
                e = {l: c for l, c in e.items() if c != 0}
            if e:
                eqs.append(e)
    eqs = list({frozenset(e.items()): e for e in eqs}.values())
    # components over labels joined by a shared equation
    parent: dict[int, int] = {}

    def find(x):
        while parent.setdefault(x, x) != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for e in eqs:
        ls = list(e)
        for l in ls[1:]:
            ra, rb = find(ls[0]), find(l)
            if ra != rb:
                parent[max(ra, rb)] = min(ra, rb)
    groups: dict[int, list[dict]] = defaultdict(list)
    for e in eqs:
        groups[find(next(iter(e)))].append(e)
    constrained, basis = set(), []
    signatures: dict = {}
    for eqs_c in groups.values():
        variables = sorted({l for e in eqs_c for l in e})
        constrained.update(variables)
        key = (_signature(eqs_c, variables), tuple(l in visible for l in variables))
        shown = [l for l in variables if l in visible]
        if not shown:
            continue
        if key in signatures:                       # same shape as a component solved before
            pattern_vars, pattern = signatures[key]
            remap = dict(zip(pattern_vars, variables))
            vecs = [{remap[l]: c for l, c in v.items()} for v in pattern]
        else:
            vecs = _visible_null_space(eqs_c, variables, visible)
            signatures[key] = (variables, vecs)
        basis.extend(vecs)
    return constrained, basis


def _signature(eqs, variables):
    """Components that are the same equations up to renaming (every head of every layer) share one
    solve: the equations written over the variables' ranks (the caller adds which ranks are visible)."""
    pos = {l: i for i, l in enumerate(variables)}
    return tuple(sorted(tuple(sorted((pos[l], c) for l, c in e.items())) for e in eqs)), len(variables)


def _visible_null_space(eqs, variables, visible):
    """Basis of {λ : Aλ = 0} projected onto the visible variables, as integer vectors: the reduced
    row echelon form of that projection over the visible variables in label order (so the result is
    canonical: any elimination order gives the same vectors).

    Both eliminations are sparse (DESIGN §3.2): a LayerNorm or RMSNorm ties every channel of the
    residual stream into one component with ~3 equations per channel and layer, and a dense
    row reduction of it grew as m^1.5 (249 s for a Llama of width 256)."""
    vis = {l for l in variables if l in visible}
    def sparse_pivot(e, occ):
        # eliminate invisible variables first (visible ones stay free where possible), then the
        # variable that the fewest rows name (the least fill-in)
        return min(e, key=lambda v: (v in vis, len(occ.get(v, ())), v))
    rows, occ = {}, {}
    for eq in eqs:
        _eliminate(rows, occ, {v: Fraction(c) for v, c in eq.items()}, sparse_pivot)
    rank = {l: k for k, l in enumerate(l for l in variables if l in vis)}
    free = [v for v in variables if v not in rows]
    prow, pocc = {}, {}
    leftmost = lambda e, occ: min(e, key=rank.__getitem__)
    for f in free:
        vec = {p: rows[p][f] for p in occ.get(f, ()) if p in vis}
        if f in vis:
            vec[f] = Fraction(1)
        if vec:
            _eliminate(prow, pocc, vec, leftmost)
    out = []
    for p in sorted(prow, key=rank.__getitem__):
        row = {p: Fraction(1), **{j: -c for j, c in prow[p].items()}}
        den = math.lcm(*[c.denominator for c in row.values()])
        ints = {l: int(c * den) for l, c in row.items()}
        g = math.gcd(*[abs(c) for c in ints.values()])
        out.append({l: ints[l] // g for l in sorted(ints, key=rank.__getitem__)})
    return out


def _eliminate(rows, occ, eq, choose):
    """Adds equation eq ({var: coeff}, meaning Σ coeff·var = 0) to the reduced system rows
    ({pivot: {free var: coeff}}, pivot = Σ coeff·free); occ: free var -> pivots whose row names it.
    Returns the new pivot, or None when eq follows from the rows."""
    e = {}
    for v, c in eq.items():
        r = rows.get(v)
        if r is None:
            e[v] = e.get(v, 0) + c
        else:
            for j, a in r.items():
                e[j] = e.get(j, 0) + c * a
    e = {v: c for v, c in e.items() if c != 0}
    if not e:
        return None
    q = choose(e, occ)
    cq = e.pop(q)
    new = {j: -c / cq for j, c in e.items()}
    for r in occ.pop(q, ()):
        row = rows[r]
        a = row.pop(q)
        for j, b in new.items():
            x = row.get(j, 0) + a * b
            if x == 0:
                if j in row:
                    del row[j]
                    occ[j].discard(r)
            else:
                if j not in row:
                    occ.setdefault(j, set()).add(r)
                row[j] = x
    rows[q] = new
    for j in new:
        occ.setdefault(j, set()).add(q)
    return q
