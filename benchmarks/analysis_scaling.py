"""How analysis and compilation time grow with a transformer's width and depth: transformers' own
LlamaForCausalLM (GQA, RMSNorm, RoPE; vocabulary 8192, MLP width 2.75 d, heads of 64, 4 query heads
per key/value head), default init.

    python benchmarks/analysis_scaling.py [--widths 128 256 512 1024] [--depths 2 4 8] [--compile]

Prints `analyze` time for every (d, L) with its time per million parameters (flat when the cost is
linear in the model), then with --compile `compile_invariant` of the largest model in both forms
(target: d 1024, L 8, about 107M parameters, <= 30 s on a 2-core CPU). Each measurement runs in a
fresh process (the largest model needs a few GB); times are the best of --repeats."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CHILD = r"""
import json, os, sys, time, warnings
os.environ["HF_HUB_OFFLINE"] = "1"
warnings.simplefilter("ignore")
import torch
import invariance_compiler as ic
from transformers import LlamaConfig, LlamaForCausalLM
d, L, what, repeats = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
torch.manual_seed(0)
heads = d // 64
cfg = LlamaConfig(vocab_size=8192, hidden_size=d, intermediate_size=(int(2.75 * d) + 63) // 64 * 64,
                  num_hidden_layers=L, num_attention_heads=heads, num_key_value_heads=max(1, heads // 4),
                  max_position_embeddings=256)
model = LlamaForCausalLM(cfg)
ids = torch.randint(0, 8192, (1, 16))
work = (lambda: ic.analyze(model, (ids,))) if what == "analyze" else \
       (lambda: ic.compile_invariant(model, (ids,), form=what))
times = []
for _ in range(repeats):
    t = time.perf_counter(); r = work(); times.append(time.perf_counter() - t)
out = {"time": min(times), "params": sum(p.numel() for p in model.parameters())}
if what == "analyze":
    out["generators"] = r.num_generators
else:
    with torch.no_grad():
        ref = model(ids).logits
        out["err"] = float((r(ids).logits - ref).norm() / ref.norm())
print(json.dumps(out))
"""


def measure(d: int, L: int, what: str, repeats: int) -> dict:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", CHILD, str(d), str(L), what, str(repeats)],
                         capture_output=True, text=True, env=env)
    if out.returncode:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--widths", type=int, nargs="+", default=[128, 256, 512, 1024])
    ap.add_argument("--depths", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--compile", action="store_true", help="also compile the largest model, both forms")
    args = ap.parse_args()
    print("| d | L | parameters | generators | analyze | per 1M parameters |")
    print("|---|---|---|---|---|---|")
    for d in args.widths:
        for L in args.depths:
            r = measure(d, L, "analyze", args.repeats)
            print(f"| {d} | {L} | {r['params'] / 1e6:.1f}M | {r['generators']} | {r['time']:.2f} s | "
                  f"{r['time'] / r['params'] * 1e6 * 1e3:.1f} ms |", flush=True)
    if args.compile:
        d, L = max(args.widths), max(args.depths)
        print(f"\n| compile_invariant, d {d}, L {L} | time | relative error of the logits |")
        print("|---|---|---|")
        for form in ("gspace", "fixed"):
            r = measure(d, L, form, 1)
            print(f"| {form} ({r['params'] / 1e6:.0f}M parameters) | {r['time']:.1f} s | {r['err']:.1e} |",
                  flush=True)


if __name__ == "__main__":
    main()
