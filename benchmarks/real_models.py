"""Analysis cost on full-size models (DESIGN §6): ViT-B/16 from transformers' own class (random
init, 224x224) and the sparse generator matrix of a VGG-11-shaped model (133M entries).

    python benchmarks/real_models.py

Each measurement runs in a fresh process; time is the second of two calls (the first pays for
imports and torch.export's warm-up), memory the peak resident set minus the one with the model
built. Targets: ViT-B/16 analyze <= 5 s and <= 3 GB; generator_matrix(sparse=True) of VGG-11
<= 15 s and <= 2x the COO result."""
from __future__ import annotations

import json
import os
import subprocess
import sys

CHILD = r"""
import json, os, sys, time, warnings, torch, torch.nn as nn
os.environ["HF_HUB_OFFLINE"] = "1"
warnings.simplefilter("ignore")
import invariance_compiler as ic
what = sys.argv[1]
torch.manual_seed(0)
def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20
def peak_mb():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmHWM")) / 1024
out = {}
if what == "vit":
    import transformers
    model = transformers.ViTModel(transformers.ViTConfig(), add_pooling_layer=False).train()
    x = torch.randn(1, 3, 224, 224)
    base = rss_mb()
    times = []
    for _ in range(2):
        t = time.perf_counter(); r = ic.analyze(model, (x,)); times.append(time.perf_counter() - t)
    out = {"time": times[-1], "first": times[0], "peak_mb": peak_mb() - base, "m": r.num_params,
           "H": r.num_generators}
else:
    cfg = [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"]
    layers, c = [], 3
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(2))
        else:
            layers += [nn.Conv2d(c, v, 3, padding=1), nn.ReLU(inplace=True)]
            c = v
    model = nn.Sequential(*layers, nn.Flatten(), nn.Linear(512 * 7 * 7, 4096), nn.ReLU(),
                          nn.Linear(4096, 4096), nn.ReLU(), nn.Linear(4096, 1000))
    r = ic.analyze(model, (torch.randn(1, 3, 224, 224),))
    base = rss_mb()
    t = time.perf_counter(); E = r.generator_matrix(sparse=True); dt = time.perf_counter() - t
    coo = (E.indices().numel() * 8 + E.values().numel() * E.values().element_size()) / 2**20
    out = {"time": dt, "peak_mb": peak_mb() - base, "nnz": E._nnz(), "coo_mb": coo, "m": r.num_params}
print(json.dumps(out))
"""


def measure(what: str) -> dict:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", CHILD, what], capture_output=True, text=True, env=env,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def table() -> str:
    vit, vgg = measure("vit"), measure("vgg")
    return "\n".join([
        "| what | m | time | peak memory | target |",
        "|---|---|---|---|---|",
        f"| analyze ViT-B/16 (transformers ViTModel, 224x224) | {vit['m']:,} | {vit['time']:.2f} s "
        f"(first call {vit['first']:.2f} s) | {vit['peak_mb']:.0f} MB | <= 5 s, <= 3 GB |",
        f"| generator_matrix(sparse=True), VGG-11-shaped | {vgg['m']:,} | {vgg['time']:.2f} s | "
        f"{vgg['peak_mb']:.0f} MB ({vgg['peak_mb'] / vgg['coo_mb']:.2f}x the {vgg['coo_mb']:.0f} MB COO result, "
        f"{vgg['nnz']:,} non-zeros) | <= 15 s, <= 2x |"])


if __name__ == "__main__":
    print(table())
