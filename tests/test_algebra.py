"""The relations' solver against a dense exact reference: the same canonical integer basis of the
null space projected onto the visible variables, on random sparse systems shaped like the ones the
rules emit (2- and 3-term relations with small integer and half-integer coefficients)."""
from __future__ import annotations

import math
import random
from fractions import Fraction

import pytest

from invariance_compiler.analyze.algebra import _visible_null_space


def _dense_rref(A):
    pivots, r = [], 0
    for c in range(len(A[0]) if A else 0):
        p = next((i for i in range(r, len(A)) if A[i][c] != 0), None)
        if p is None:
            continue
        A[r], A[p] = A[p], A[r]
        A[r] = [x / A[r][c] for x in A[r]]
        for i in range(len(A)):
            if i != r and A[i][c] != 0:
                f = A[i][c]
                A[i] = [x - f * y for x, y in zip(A[i], A[r])]
        pivots.append(c)
        r += 1
    del A[r:]
    return pivots


def _reference(eqs, variables, visible):
    """Null space by dense RREF, projected onto the visible variables, then RREF'd and scaled."""
    n = len(variables)
    pos = {l: i for i, l in enumerate(variables)}
    A = [[Fraction(0)] * n for _ in eqs]
    for r, e in enumerate(eqs):
        for l, c in e.items():
            A[r][pos[l]] += Fraction(c)
    pivots = _dense_rref(A)
    null = []
    for f in (j for j in range(n) if j not in pivots):
        v = [Fraction(0)] * n
        v[f] = Fraction(1)
        for r, p in enumerate(pivots):
            v[p] = -A[r][f]
        null.append(v)
    vis = [i for i, l in enumerate(variables) if l in visible]
    projected = [[v[i] for i in vis] for v in null]
    piv = _dense_rref(projected) if projected else []
    out = []
    for r, row in enumerate(projected):
        den = math.lcm(*[c.denominator for c in row if c])
        ints = [int(c * den) for c in row]
        g = math.gcd(*[abs(c) for c in ints if c])
        out.append({variables[vis[k]]: c // g for k, c in enumerate(ints) if c})
    return out


def _system(rng, n):
    variables = sorted(rng.sample(range(10 * n), n))
    eqs = []
    for _ in range(rng.randint(1, n + 3)):
        terms = rng.sample(variables, min(n, rng.choice([1, 2, 2, 3, 3, 4])))
        e = {l: Fraction(rng.choice([1, -1, 2, -2, 1, -1])) * rng.choice([1, 1, Fraction(1, 2)]) for l in terms}
        eqs.append(e)
    visible = {l for l in variables if rng.random() < 0.8}
    return eqs, variables, visible


@pytest.mark.parametrize("seed", range(40))
def test_sparse_solver_equals_dense_reference(seed):
    rng = random.Random(seed)
    eqs, variables, visible = _system(rng, rng.randint(2, 30))
    got = _visible_null_space(eqs, variables, visible)
    want = _reference(eqs, variables, visible)
    assert [sorted(v.items()) for v in got] == [sorted(v.items()) for v in want]
    for v in got:                                     # each vector: integers, coprime, pivot > 0
        assert all(isinstance(c, int) and c for c in v.values())
        assert math.gcd(*map(abs, v.values())) == 1 and next(iter(v.values())) > 0


def test_residual_stream_component():
    """An RMSNorm-like stream (mean(x²) = 2·x_i per channel, then a 3-term relation per channel and
    layer): one generator per layer over its d visible channels (time: benchmarks/analysis_scaling.py)."""
    d, layers = 1000, 4
    eqs, variables = [], []
    base = 10 ** 6
    for layer in range(layers):
        s = base + layer                                  # the layer's mean(x²) class
        variables.append(s)
        for i in range(d):
            x, y = layer * d + i, base * 2 + layer * d + i
            variables += [x, y]
            eqs.append({s: Fraction(1), x: Fraction(-2)})
            eqs.append({y: Fraction(1), x: Fraction(-1), s: Fraction(-1)})
    variables.sort()
    visible = {v for v in variables if v < base}
    got = _visible_null_space(eqs, variables, visible)
    assert len(got) == layers and all(len(v) == d for v in got)
