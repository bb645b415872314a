"""Analysis of a ResNet-50-shaped model at 224x224 and of one twice as deep: wall time and peak memory.

    python benchmarks/analyze_resnet.py [--repeats 3]

Each configuration runs in a fresh process (peak RSS is per process); time is the median of the
repeats after one warm-up; memory is the peak resident set during analysis minus the resident set
with the model built. Targets (DESIGN §6): ResNet-50 <= 5 s and <= 2 GB; cost linear in the graph."""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys

CONFIGS = {"resnet50": (3, 4, 6, 3), "resnet50 x2 depth": (6, 8, 12, 6)}

CHILD = r"""
import json, resource, statistics, sys, time, torch
import invariance_compiler as ic
from invariance_compiler.zoo import resnet50_like
torch.manual_seed(0)
model = resnet50_like(tuple(json.loads(sys.argv[1])))
x = torch.randn(1, 3, 224, 224)
def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20
base = rss_mb()
times = []
for i in range(int(sys.argv[2]) + 1):
    t = time.perf_counter(); r = ic.analyze(model, x); times.append(time.perf_counter() - t)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
nodes = len(r.graph.graph.nodes)
print(json.dumps({"time": statistics.median(times[1:]), "first": times[0], "peak_mb": peak - base,
                  "m": r.num_params, "H": r.num_generators, "nodes": nodes}))
"""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]))
    rows = []
    for name, blocks in CONFIGS.items():
        out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(blocks), str(args.repeats)],
                             capture_output=True, text=True, env=env, check=True)
        rows.append((name, json.loads(out.stdout.strip().splitlines()[-1])))
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch {__import__('torch').__version__}\n")
    print("| model | fx nodes | m | H | analyze (median) | first call | peak memory | time / node |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in rows:
        print(f"| {name} | {r['nodes']} | {r['m']:,} | {r['H']:,} | {r['time']:.2f} s | {r['first']:.2f} s "
              f"| {r['peak_mb']:.0f} MB | {1000 * r['time'] / r['nodes']:.1f} ms |")
    (a, ra), (b, rb) = rows
    print(f"\ntime ratio {b} / {a}: {rb['time'] / ra['time']:.2f} for a node ratio of "
          f"{rb['nodes'] / ra['nodes']:.2f} (linear cost: about equal)")


if __name__ == "__main__":
    main()
