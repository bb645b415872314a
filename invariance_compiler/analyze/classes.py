"""Channel classes: fresh ids, unions recorded as edges, connected components solved once at the end,
and the few linear relations that are not unions (DESIGN §3.2, the exponent algebra).

Rules never need a find() while the graph is walked: a union is just an edge between two ids, and an
id stays a valid name for its class forever. `solve` labels every id with the smallest id of its
component, so PIN (0) labels every pinned class.

A product, a power or a contraction of scaled tensors gives its result a fresh class per element
(compactly) and records a relation Σ coeff · λ(id) = 0 per element: λ(x·y) = λ(x) + λ(y),
λ(xᵖ) = p·λ(x), λ(Σ_k a_ik b_kj) = λ(a_ik) + λ(b_kj) for every k. `algebra.solve_relations` solves
them exactly after the unions.
"""
from __future__ import annotations

from fractions import Fraction

import torch

from .value import PIN

__all__ = ["ClassTable"]


class ClassTable:
    def __init__(self):
        self.count = 1                      # id 0 is PIN
        self._a: list[torch.Tensor] = []
        self._b: list[torch.Tensor] = []
        # relations, in batches that share their coefficients: (ids (rows, terms), coeffs per term)
        self.relations: list[tuple[torch.Tensor, tuple[Fraction, ...]]] = []

    def fresh(self, n: int) -> torch.Tensor:
        ids = torch.arange(self.count, self.count + n, dtype=torch.long)
        self.count += n
        return ids

    def union(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Record that a and b (broadcast against each other) share a scale; return the merged ids.
        ZERO entries are compatible with anything and create no edge."""
        a, b = torch.broadcast_tensors(a, b)
        keep = (a >= PIN) & (b >= PIN) & (a != b)
        if bool(keep.any()):
            self._a.append(a[keep].reshape(-1))
            self._b.append(b[keep].reshape(-1))
        return torch.maximum(a, b)   # either id names the class; max skips ZERO (-1)

    def pin(self, ids: torch.Tensor) -> bool:
        """Force scale 1; True when something other than PIN/ZERO was pinned."""
        live = ids[ids > PIN]
        if live.numel():
            self.union(live.unique(), torch.zeros((), dtype=torch.long))
        return live.numel() > 0

    def relate(self, terms: list[tuple[Fraction, torch.Tensor]]) -> None:
        """Record Σ coeff · λ(ids[e]) = 0 for every element e of the terms' broadcast shape."""
        shape = torch.broadcast_shapes(*[ids.shape for _, ids in terms])
        ids = torch.stack([i.expand(shape).reshape(-1) for _, i in terms], dim=1)    # (rows, terms)
        ids = ids.unique(dim=0) if ids.shape[0] > 1 else ids
        self.relations.append((ids, tuple(Fraction(c) for c, _ in terms)))

    def solve(self) -> torch.Tensor:
        """Label of every id: the smallest id in its component (min-label hooking + pointer jumping)."""
        parent = torch.arange(self.count, dtype=torch.long)
        if not self._a:
            return parent
        a, b = torch.cat(self._a), torch.cat(self._b)
        while True:
            pa, pb = parent[a], parent[b]
            if torch.equal(pa, pb):
                return parent
            lo, hi = torch.minimum(pa, pb), torch.maximum(pa, pb)
            parent.scatter_reduce_(0, hi, lo, reduce="amin")
            while True:   # full path compression: every parent becomes a root
                nxt = parent[parent]
                if torch.equal(nxt, parent):
                    break
                parent = nxt
