"""Paths and the structure matrix A (G-SGD §3) for small networks.

Every weight entry is an edge from the class it reads (the input when that side is pinned) to the
class it produces (the output when pinned); a path is an input -> output walk, its row of A marks the
entries on it. Each path enters and leaves every class once, so A E = 0. A has as many rows as there
are paths, exponentially many: we count them first and refuse above `max_paths`."""
from __future__ import annotations

import networkx as nx
import torch

__all__ = ["structure_matrix"]

SOURCE, SINK = "input", "output"


def structure_matrix(report, max_paths: int = 100_000) -> torch.Tensor:
    counts = report.counts()
    if counts["normalize"]:
        raise ValueError(f"structure matrix: paths are defined for networks without normalisers "
                         f"(G-SGD §3); this model has {counts['normalize']} normalize generators")
    edges: dict[tuple, list[torch.Tensor]] = {}
    offset = 0
    for name in report.param_names:
        shape = report.param_shapes[name]
        if report._factors.get(name):
            inp, out = report.sides(name)
            src, dst = inp.expand(shape).reshape(-1), out.expand(shape).reshape(-1)
            rows = offset + torch.arange(shape.numel())
            for u, v, r in _group(src, dst, rows):
                edges.setdefault((u, v), []).append(r)
        offset += shape.numel()
    g = nx.DiGraph()
    g.add_nodes_from([SOURCE, SINK])
    for (u, v), rs in edges.items():
        g.add_edge(u, v, rows=torch.cat(rs))
    if not nx.is_directed_acyclic_graph(g):
        cycle = nx.find_cycle(g)
        raise ValueError(f"structure matrix: the class graph has a cycle ({cycle[:3]}...), e.g. a residual "
                         f"stream or a weight shared across layers; paths are only enumerable on acyclic ones")
    order = list(nx.topological_sort(g))
    n_paths = {SOURCE: 1}
    for v in order:
        if v != SOURCE:
            n_paths[v] = sum(n_paths.get(u, 0) * len(g.edges[u, v]["rows"]) for u in g.predecessors(v))
    total = n_paths.get(SINK, 0)
    if total > max_paths:
        raise ValueError(f"structure matrix: the network has {total} input-output paths, more than "
                         f"max_paths={max_paths}; A is only for small networks")
    # paths[v]: (count, m) 0/1 rows of the partial paths from the input to v
    paths = {SOURCE: torch.zeros(1, report.num_params)}
    for v in order:
        if v == SOURCE:
            continue
        parts = []
        for u in g.predecessors(v):
            if u not in paths or paths[u].shape[0] == 0:
                continue
            rows = g.edges[u, v]["rows"]
            ext = paths[u].repeat_interleave(len(rows), dim=0)        # each partial path x each entry
            ext[torch.arange(ext.shape[0]), rows.repeat(paths[u].shape[0])] = 1.0
            parts.append(ext)
        paths[v] = torch.cat(parts) if parts else torch.zeros(0, report.num_params)
    return paths[SINK]


def _group(src, dst, rows):
    pairs = torch.stack([src, dst], dim=1)
    uniq, inv = torch.unique(pairs, dim=0, return_inverse=True)
    for k, (u, v) in enumerate(uniq.tolist()):
        yield (SOURCE if u < 0 else u), (SINK if v < 0 else v), rows[inv == k]
