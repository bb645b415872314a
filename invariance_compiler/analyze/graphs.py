"""The layer graph of a report: which layer's classes are consumed by which layer."""
from __future__ import annotations

from collections import Counter

import networkx as nx

__all__ = ["to_networkx", "to_dot"]


def to_networkx(report) -> "nx.DiGraph":
    """Nodes are layers (with their parameter count and the normalize/inert generators they carry);
    an edge u -> v carries the rescale generators produced in u and consumed in v."""
    g = nx.DiGraph()
    for layer, names in report.layers().items():
        g.add_node(layer, type=report.layer_types[names[0]],
                   params=sum(report.param_shapes[n].numel() for n in names), normalize=0, inert=0)
    edges = Counter()
    for gen in report.generators:
        if gen.kind != "rescale":
            g.nodes[gen.params[0].rsplit(".", 1)[0] if "." in gen.params[0] else gen.params[0]][gen.kind] += 1
            continue
        entries = gen.entries()
        producers = {_layer(n) for n, (_, s) in entries.items() if bool((s > 0).any())}
        consumers = {_layer(n) for n, (_, s) in entries.items() if bool((s < 0).any())}
        for u in producers:
            for v in consumers:
                edges[(u, v)] += 1
    for (u, v), k in edges.items():
        g.add_edge(u, v, rescale=k)
    return g


def to_dot(report) -> str:
    g = to_networkx(report)
    lines = ["digraph symmetry {", "  rankdir=LR; node [shape=box, fontname=Helvetica];"]
    for n, d in g.nodes(data=True):
        extra = "".join(f"\\n{d[k]} {k}" for k in ("normalize", "inert") if d[k])
        lines.append(f'  "{n}" [label="{n}\\n{d["type"]} ({d["params"]}){extra}"];')
    for u, v, d in g.edges(data=True):
        lines.append(f'  "{u}" -> "{v}" [label="{d["rescale"]}"];')
    lines.append("}")
    return "\n".join(lines)


def _layer(name):
    return name.rsplit(".", 1)[0] if "." in name else name
