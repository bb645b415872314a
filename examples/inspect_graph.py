"""Look inside a compilation: the report table, the class graph (DOT, and a picture when graphviz's
`dot` is installed, else drawn by networkx), and the emitted program of both forms.

    python examples/inspect_graph.py [--model NAME] [--out out/inspect]

NAME is one of `python -m invariance_compiler zoo` (default: resnet_basic). Writes NAME.dot,
NAME.png, NAME_report.md and NAME_gspace.py / NAME_fixed.py."""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import warnings

import torch

import invariance_compiler as ic
from invariance_compiler.analyze.graphs import to_dot, to_networkx
from invariance_compiler.tools.zoo import ZOO


def draw(g, png: str, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import networkx as nx
    fig, ax = plt.subplots(figsize=(max(8, 0.9 * len(g)), 5))
    pos = {n: (i, (i % 3) - 1) for i, n in enumerate(g.nodes)}    # model order, left to right
    arc = "arc3,rad=0.25"                                       # curved: edges skip the nodes between
    nx.draw_networkx(g, pos, ax=ax, node_color="#cde", node_size=900, font_size=7, arrowsize=12,
                     connectionstyle=arc)
    nx.draw_networkx_edge_labels(g, pos, {(u, v): d["rescale"] for u, v, d in g.edges(data=True)},
                                 ax=ax, font_size=7, connectionstyle=arc)
    ax.set_title(f"{title}: layer u -> v carries the rescale generators produced in u, consumed in v")
    ax.axis("off")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="resnet_basic", choices=sorted(ZOO))
    ap.add_argument("--out", default="out/inspect")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    base = os.path.join(args.out, args.model)
    torch.manual_seed(0)
    model, inputs = ZOO[args.model]()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = ic.analyze(model, inputs)

    print(report)                                            # 1. the per-layer table
    with open(base + "_report.md", "w") as f:
        f.write(f"# {args.model}\n\n```\n{report}\n```\n")

    g = to_networkx(report)                                  # 2. which layer's classes reach which
    print(f"\nclass graph: {g.number_of_nodes()} layers, {g.number_of_edges()} edges "
          f"(an edge carries the rescale generators produced in one layer and consumed in the other)")
    for u, v, d in g.edges(data=True):
        print(f"  {u} -> {v}: {d['rescale']} rescale")
    with open(base + ".dot", "w") as f:
        f.write(to_dot(report))
    files = [base + "_report.md", base + ".dot"]
    if shutil.which("dot"):
        subprocess.run(["dot", "-Tpng", base + ".dot", "-o", base + ".png"], check=True)
        files.append(base + ".png")
    else:                                                    # no graphviz: networkx + matplotlib
        draw(g, base + ".png", args.model)
        files.append(base + ".png (drawn without graphviz)")

    for form in ("gspace", "fixed"):                          # 3. the emitted programs
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cm = ic.compile_invariant(model, inputs, form=form)
        with torch.no_grad():
            err = (cm(*inputs) - model(*inputs)).abs().max().item()
        print(f"\n== form={form!r}: {cm.num_free_parameters()} free of {report.num_params} parameters, "
              f"max |output difference| {err:.1e}\n{cm.code.strip()}")
        with open(f"{base}_{form}.py", "w") as f:
            f.write(cm.code)
        files.append(f"{base}_{form}.py")
    print("\nwrote " + ", ".join(files))


if __name__ == "__main__":
    main()
