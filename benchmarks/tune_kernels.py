"""Tile sizes of the grouped kernels against achieved bandwidth (GPU only).

    python benchmarks/tune_kernels.py [--side 4096]

For each (BS, BR, ROWS, warps) it rebuilds the layout of a ReLU MLP's two side² weights and times
WA, ICR and the G-SGD step's two passes (kernel time, torch.profiler); prints GB/s and the share of
the device's peak. Tiling's defaults in kernels/layout.py come from this table."""
from __future__ import annotations

import argparse
import itertools

import torch

from invariance_compiler import kernels
from invariance_compiler.kernels.layout import Tiling, build_group
from invariance_compiler.tools.profile import bench_group, kernel_ms, peak_bandwidth


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--side", type=int, default=4096)
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("tune_kernels: needs a CUDA GPU")
    dev = torch.device("cuda")
    plan, c, p_in, vs, gws, ws, bufs = bench_group(dev, args.side)
    nbytes = sum(v.numel() for v in vs) * 4
    peak = peak_bandwidth(dev) or float("nan")
    print(f"{torch.cuda.get_device_name()}, {sum(v.numel() for v in vs) / 1e6:.1f}M fp32 entries; % of peak")
    print("| BS | BR | ROWS | warps | WA | ICR | reduce | update |\n|---|---|---|---|---|---|---|---|")
    for bs, br, rows, warps in itertools.product((64, 128, 256), (8, 16, 32), (64, 256), (4, 8)):
        if rows < br or bs * br > 4096 or bs * br < 1024:
            continue
        tiling = Tiling(BS=bs, BR=br, ROWS=rows, WARPS=warps)
        L = build_group([plan.tensor_slots(i) for i in plan.wa], plan.n, plan.M.dtype, tiling).to(dev)
        wa, icr, step = kernels.wa, kernels.icr, kernels.gsgd_step
        runs = {"WA": (2, lambda: wa.launch(vs, p_in, plan.M, c, L, plan.n)),
                "ICR": (3, lambda: icr.launch(gws, vs, p_in, plan.M, c, L, plan.n)),
                "reduce": (2, lambda: step.launch_reduce(gws, ws, p_in, plan.M, c.numel(), L, plan.n)),
                "update": (6, lambda: step.launch_update(gws, vs, bufs, ws, p_in, p_in, plan.M, c, L, plan.n,
                                                         1e-9, 0.9, 0.0, False))}
        cells = [f"{100 * k * nbytes / (kernel_ms(fn) * 1e-3) / peak:.0f}" for k, fn in runs.values()]
        print(f"| {bs} | {br} | {rows} | {warps} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
