"""Channel classes: fresh ids, unions recorded as edges, connected components solved once at the end.

Rules never need a find() while the graph is walked: a union is just an edge between two ids, and an
id stays a valid name for its class forever. `solve` labels every id with the smallest id of its
component, so PIN (0) labels every pinned class.
"""
from __future__ import annotations

import torch

from .value import PIN

__all__ = ["ClassTable"]


class ClassTable:
    def __init__(self):
        self.count = 1                      # id 0 is PIN
        self._a: list[torch.Tensor] = []
        self._b: list[torch.Tensor] = []

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
