"""The exponent algebra's linear part (DESIGN §3.2): relations Σ coeff · λ(label) = 0 between class
labels, solved exactly in rationals.

After the unions every class is a label; most labels take part in no relation and are one generator
each. The rest form small connected components (one per attention head, per decomposed norm): for
each, the null space of its relations, restricted to the labels that parameters see, is a set of
generators with small integer coefficients (RREF over Fractions, then scaled to integers)."""
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
            e: dict[int, Fraction] = defaultdict(Fraction)
            for l, c in zip(row, coeffs):
                if l > PIN:
                    e[l] += c
            e = {l: c for l, c in e.items() if c != 0}
            if e:
                eqs.append(e)
    eqs = list({tuple(sorted(e.items())): e for e in eqs}.values())
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
    """Basis of {λ : Aλ = 0} projected onto the visible variables, as integer vectors."""
    n = len(variables)
    pos = {l: i for i, l in enumerate(variables)}
    A = [[Fraction(0)] * n for _ in eqs]
    for r, e in enumerate(eqs):
        for l, c in e.items():
            A[r][pos[l]] = Fraction(c)
    # put visible variables last so that they are free where possible (small, readable vectors)
    order = [i for i, l in enumerate(variables) if l not in visible] + \
            [i for i, l in enumerate(variables) if l in visible]
    A = [[row[i] for i in order] for row in A]
    pivots = _rref(A)
    free = [j for j in range(n) if j not in pivots]
    null = []
    for f in free:
        v = [Fraction(0)] * n
        v[f] = Fraction(1)
        for r, p in enumerate(pivots):
            v[p] = -A[r][f]
        null.append(v)
    vis_cols = [k for k, i in enumerate(order) if variables[i] in visible]
    projected = [[v[k] for k in vis_cols] for v in null]
    piv = _rref(projected)
    out = []
    for r in range(len(piv)):
        row = projected[r]
        den = math.lcm(*[c.denominator for c in row if c != 0])
        ints = [int(c * den) for c in row]
        g = math.gcd(*[abs(c) for c in ints if c])
        if ints[piv[r]] < 0:
            g = -g
        out.append({variables[order[vis_cols[k]]]: c // g for k, c in enumerate(ints) if c})
    return out


def _rref(A):
    """In-place reduced row echelon form; returns the pivot column of each non-zero row (A is
    truncated to those rows)."""
    pivots, r = [], 0
    rows = len(A)
    cols = len(A[0]) if A else 0
    for c in range(cols):
        p = next((i for i in range(r, rows) if A[i][c] != 0), None)
        if p is None:
            continue
        A[r], A[p] = A[p], A[r]
        inv = 1 / A[r][c]
        A[r] = [x * inv for x in A[r]]
        for i in range(rows):
            if i != r and A[i][c] != 0:
                f = A[i][c]
                A[i] = [x - f * y for x, y in zip(A[i], A[r])]
        pivots.append(c)
        r += 1
        if r == rows:
            break
    del A[r:]
    return pivots
