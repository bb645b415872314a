"""Equalization for per-tensor weight quantization: ic.equalize beside Brevitas's EqualizeGraph.

    python benchmarks/equalize_table.py [--out results/equalize.md]     # about 2 minutes on 2 cores

1. A MobileNet-style CNN (zoo.digits_mobilenet) trained on scikit-learn's digits, BatchNorm folded
   (ic.fold_batchnorm, exact): test accuracy and output SQNR against the float model, with weights
   rounded per tensor to int8 / int6 / int4, after no equalization, Brevitas's EqualizeGraph and
   ic.equalize (range and l2 objectives).
2. Coverage: how many channels (rescale classes) each method equalizes, per model.
3. Worst case: transformers' own small models (random init) moved by a random element of their
   rescaling group (the function does not see it), int8 output SQNR after each method. A method that
   cannot take a model says so in its cell. (MobileNetV2 and EfficientNet are left out here: at
   Hugging Face's init, std 0.02, their tiny instances' outputs vanish, about 1e-30, and an SQNR of
   them measures nothing.)"""
from __future__ import annotations

import argparse
import copy
import inspect
import os
import sys
import time
import warnings

import torch
import torch.fx

import invariance_compiler as ic
from invariance_compiler.tools import demo
from invariance_compiler.analyze import oracle
from invariance_compiler.equalize import quantize_weights_, sqnr_db
from invariance_compiler.tools.zoo import ZOO, digits_mobilenet



def brevitas(model: torch.nn.Module, args=(), kwargs=None):
    """(equalized GraphModule, channels equalized) or (None, why not). torch.fx's symbolic trace
    first, then Brevitas's value trace on the example (it gets past shape-dependent branches)."""
    try:
        import brevitas.fx
        from brevitas.graph.equalize import EqualizeGraph
    except ImportError:
        return None, "brevitas not installed"
    model = copy.deepcopy(model)
    try:
        gm = torch.fx.symbolic_trace(model)
    except Exception as e:                                  # noqa: BLE001 - reported in the table
        values = dict(zip(inspect.signature(model.forward).parameters, args), **(kwargs or {}))
        try:
            gm = brevitas.fx.value_trace(model, value_args=values)
        except Exception as e2:                             # noqa: BLE001
            return None, f"fails to trace ({type(e).__name__}; value trace: {type(e2).__name__})"
    try:
        gm, regions = EqualizeGraph(iterations=20, return_regions=True).apply(gm)
    except Exception as e:                                  # noqa: BLE001
        return None, f"fails to equalize ({type(e).__name__})"
    return gm, sum(r.max_shape_srcs for r in regions)


def ours(model, args, kwargs=None, objective="range"):
    m = copy.deepcopy(model)
    eq = ic.equalize(m, args, kwargs, objective=objective)
    return m, eq.classes.numel()


def digits_section() -> str:
    torch.manual_seed(0)
    data = demo.digits()
    net = digits_mobilenet()
    demo.train(net, torch.optim.Adam(net.parameters(), lr=3e-3), data, epochs=15)
    net.eval()
    ic.fold_batchnorm(net, data[0][:2])
    x, y = data[2], data[3]
    variants = {"none": net, "Brevitas EqualizeGraph": brevitas(net)[0],
                "ic.equalize (range)": ours(net, data[0][:2])[0],
                "ic.equalize (l2)": ours(net, data[0][:2], objective="l2")[0]}
    with torch.no_grad():
        ref = net(x)
        rows = ["| equalization | float acc | int8 acc | int6 acc | int4 acc | int8 SQNR | int6 SQNR | int4 SQNR |",
                "|---|---|---|---|---|---|---|---|"]
        for name, m in variants.items():
            if m is None:
                rows.append(f"| {name} | not available | | | | | | |")
                continue
            acc = lambda mm: 100 * float((mm(x).argmax(1) == y).float().mean())   # noqa: E731
            qs = {b: quantize_weights_(copy.deepcopy(m), b) for b in (8, 6, 4)}
            rows.append(f"| {name} | {acc(m):.1f} % | " + " | ".join(f"{acc(qs[b]):.1f} %" for b in (8, 6, 4)) +
                        " | " + " | ".join(f"{sqnr_db(ref, qs[b](x)):.1f} dB" for b in (8, 6, 4)) + " |")
    return "\n".join(rows)


def coverage_section() -> str:
    from invariance_compiler.tools.hf_families import build
    rows = ["| model | ic.equalize: classes | Brevitas EqualizeGraph: channels |", "|---|---|---|"]
    torch.manual_seed(0)
    net = digits_mobilenet().eval()
    ic.fold_batchnorm(net, torch.randn(2, 64))
    cases = [("digits_mobilenet (BN folded)", net, (torch.randn(2, 64),), {})]
    for name in ("mlp", "residual_mlp", "split_cat", "densenet", "resnet_bottleneck", "mini_transformer"):
        torch.manual_seed(0)
        m, x = ZOO[name]()
        cases.append((f"zoo {name}", m.eval(), x, {}))
    for name in ("resnet", "mobilenet_v2", "vit", "llama"):
        m, a, k = build(name, dropout=False)
        cases.append((f"transformers {name}", m.float().eval(),
                      tuple(t.float() if t.is_floating_point() else t for t in a), k))
    for label, m, a, k in cases:
        _, n = ours(m, a, k)
        rows.append(f"| {label} | {n} | {brevitas(m, a, k)[1]} |")
    return "\n".join(rows)


def worst_case_section() -> str:
    from invariance_compiler.tools.hf_families import build
    rows = ["| model | int8 SQNR: as initialised | moved by g | then ic.equalize (range) | "
            "then ic.equalize (l2) | then Brevitas |", "|---|---|---|---|---|---|"]
    for name in ("resnet", "regnet", "vit", "llama"):
        model, args, kwargs = build(name, dropout=False)
        model = oracle.prepare(model).eval()
        report = ic.analyze(model, args, kwargs)
        lam = torch.zeros(report.num_generators, dtype=torch.float64)
        g = torch.Generator().manual_seed(0)
        for c, (kind, _) in enumerate(report.generators._info[: report.num_simple]):
            if kind == "rescale":
                lam[c] = torch.randn((), generator=g, dtype=torch.float64)
        start = copy.deepcopy(model)
        report.act(model, lam)
        with torch.no_grad():
            ref = oracle._flat_tensors(model(*args, **kwargs))[0]
            cells = []
            theirs, why = brevitas(model, args, kwargs)
            for m in (start, model, ours(model, args, kwargs)[0], ours(model, args, kwargs, "l2")[0], theirs):
                if m is None:
                    cells.append(why)
                    continue
                q = quantize_weights_(copy.deepcopy(m), 8)
                out = oracle._flat_tensors(q(*args, **kwargs))[0]
                cells.append(f"{sqnr_db(ref, out):.1f} dB")
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="also write the tables to this markdown file")
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    t0 = time.time()
    parts = [("Digits MobileNet, BN folded, per-tensor symmetric weights", digits_section()),
             ("Coverage: channels equalized", coverage_section()),
             ("Worst case: random group element, int8 per tensor (output SQNR against the float model)",
              worst_case_section())]
    text = "\n\n".join(f"## {title}\n\n{table}" for title, table in parts)
    text += f"\n\n({time.time() - t0:.0f} s; torch {torch.__version__})\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write("# Equalization for per-tensor quantization (`python benchmarks/equalize_table.py`)\n\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
