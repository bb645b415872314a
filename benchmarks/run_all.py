"""Every overhead benchmark in one command; writes a markdown report (default benchmarks/results.md).

    python benchmarks/run_all.py [--quick] [--out benchmarks/results.md]

  1. train step (forward, backward, SGD) of the gspace and fixed modules over the original model,
     MLP and CNN: train_step.py
  2. the G-SGD optimizer step over torch.optim.SGD(foreach=True): gsgd_step.py
  3. analyze and compile_invariant time and peak memory, ResNet-50-shaped model: resnet50_cost.py
  4. analyze ViT-B/16 (transformers) and the sparse generator matrix of VGG-11: real_models.py
Ratios are medians of per-round ratios of interleaved runs; times are medians of repeats.
--quick uses fewer repeats (a smoke run: the figures are noisier). About 3 minutes on 2 cores."""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gsgd_step  # noqa: E402
import real_models  # noqa: E402
import resnet50_cost  # noqa: E402
import train_step  # noqa: E402


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return (f"{cpu}, {os.cpu_count()} cores ({torch.get_num_threads()} torch threads){gpu}; "
            f"Python {platform.python_version()}, torch {torch.__version__}, {platform.system()}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results.md"))
    ap.add_argument("--quick", action="store_true", help="few repeats: checks that everything runs")
    args = ap.parse_args(argv)
    warnings.simplefilter("ignore")
    reps = (5, 5, 1) if args.quick else (30, 40, 3)
    parts = [f"# Overhead benchmarks\n\n{machine()}; {time.strftime('%Y-%m-%d %H:%M')}; "
             f"`python benchmarks/run_all.py{' --quick' if args.quick else ''}`."]
    sections = [("Training step: compiled modules over the original (target gspace <= 1.10)",
                 lambda: train_step.table(reps[0])),
                ("G-SGD optimizer step over torch.optim.SGD(foreach=True), MLP and ResNet-18-shaped (target <= 2.0)",
                 lambda: gsgd_step.table(reps[1])),
                ("ResNet-50-shaped model, 224x224: analyze and compile (targets 5 s / 2 GB, 10 s)",
                 lambda: resnet50_cost.table(reps[2])),
                ("Full-size models: ViT-B/16 analyze (targets 5 s / 3 GB), VGG-11 sparse E (15 s / 2x COO)",
                 real_models.table)]
    for title, run in sections:
        t = time.perf_counter()
        print(f"running: {title} ...", flush=True)
        body = run()
        parts.append(f"## {title}\n\n{body}\n\n({time.perf_counter() - t:.0f} s)")
        print(body + "\n", flush=True)
    with open(args.out, "w") as f:
        f.write("\n\n".join(parts) + "\n")
    print(f"wrote {os.path.abspath(args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
