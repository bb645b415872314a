"""Analysis and compilation of a ResNet-50-shaped model at 224x224 (and analysis of one twice as
deep): wall time and peak memory.

    python benchmarks/resnet50_cost.py [--repeats 3]

Each measurement runs in a fresh process (peak RSS is per process); time is the median of the
repeats after one warm-up; memory is the peak resident set during the work minus the resident set
with the model built. Targets (DESIGN §6): analyze <= 5 s and <= 2 GB, compile <= 10 s; analysis
cost linear in the graph."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CONFIGS = {"resnet50": (3, 4, 6, 3), "resnet50 x2 depth": (6, 8, 12, 6)}

CHILD = r"""
import json, statistics, sys, time, warnings, torch
import invariance_compiler as ic
from invariance_compiler.tools.zoo import resnet50_like
warnings.simplefilter("ignore")
torch.manual_seed(0)
blocks, repeats, what = tuple(json.loads(sys.argv[1])), int(sys.argv[2]), sys.argv[3]
model = resnet50_like(blocks)
x = torch.randn(1, 3, 224, 224)
def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20
work = (lambda: ic.analyze(model, x)) if what == "analyze" else \
       (lambda: ic.compile_invariant(model, x, form=what))
base = rss_mb()
times = []
for i in range(repeats + 1):
    t = time.perf_counter(); r = work(); times.append(time.perf_counter() - t)
with open("/proc/self/status") as f:   # VmHWM, not ru_maxrss: that one keeps the parent's peak across exec
    peak = next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024
out = {"time": statistics.median(times[1:]), "first": times[0], "peak_mb": peak - base}
if what == "analyze":
    out.update(m=r.num_params, H=r.num_generators, nodes=len(r.graph.graph.nodes))
else:
    with torch.no_grad():
        y = torch.randn(2, 3, 224, 224); ref = model(y)
        out["err"] = float((r(y) - ref).norm() / ref.norm())
print(json.dumps(out))
"""


def measure(blocks, what: str, repeats: int) -> dict:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(blocks), str(repeats), what],
                         capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def table(repeats: int = 3) -> str:
    rows = ["| what | fx nodes | m | H | time (median) | first call | peak memory | note |",
            "|---|---|---|---|---|---|---|---|"]
    an = {}
    for name, blocks in CONFIGS.items():
        r = an[name] = measure(blocks, "analyze", repeats)
        rows.append(f"| analyze, {name} | {r['nodes']} | {r['m']:,} | {r['H']:,} | {r['time']:.2f} s "
                    f"| {r['first']:.2f} s | {r['peak_mb']:.0f} MB | {1000 * r['time'] / r['nodes']:.1f} ms / node |")
    for form in ("gspace", "fixed"):
        r = measure(CONFIGS["resnet50"], form, max(1, repeats - 1))
        rows.append(f"| compile_invariant, resnet50, {form} | | | | {r['time']:.2f} s | {r['first']:.2f} s "
                    f"| {r['peak_mb']:.0f} MB | output rel. error {r['err']:.1e} (float32) |")
    (a, ra), (b, rb) = an.items()
    rows.append(f"\nAnalysis time ratio {b} / {a}: {rb['time'] / ra['time']:.2f} for a node ratio of "
                f"{rb['nodes'] / ra['nodes']:.2f} (linear cost: about equal).")
    return "\n".join(rows)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    print(table(ap.parse_args().repeats))


if __name__ == "__main__":
    main()
