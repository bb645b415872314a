"""`python -m invariance_compiler profile`: what the kernels cost.

  1. Per kernel (WA, ICR, the G-SGD step's two passes) on a group of large tensors: time, achieved
     GB/s (bytes the kernel must move / time) and the share of the device's peak bandwidth, beside
     a plain copy of the same bytes and the PyTorch reference path. GPU: kernel time from
     torch.profiler (launch overhead excluded; the step table below includes it). CPU: the whole
     fused G-SGD optimizer step (kernels/cpu_step.cpp) beside torch.optim.SGD(foreach=True).
  2. A whole training step with GSGD over the same step with torch.optim.SGD(foreach=True):
     ResNet-18-shaped model at batch 128 on a GPU, the MLP 784-1024x3-10 at batch 256 on CPU;
     interleaved rounds, median of the per-round ratios.
  3. torch.profiler's per-kernel table of a G-SGD training step (a chrome trace on request).
Without a GPU it profiles the reference path and says that GPU figures need a GPU."""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import compile_invariant, kernels
from ..codegen.forms import icr
from ..optim import GSGD

# peak HBM bandwidth (TB/s) by device name, most specific first (DESIGN §4)
PEAK_TBS = [("H200", 4.8), ("H100 PCIe", 2.0), ("H100", 3.35), ("A100", 2.0)]


def peak_bandwidth(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tbs * 1e12 for key, tbs in PEAK_TBS if key in name), None)


def kernel_ms(fn, reps: int = 20) -> float:
    """GPU time per call of the kernels `fn` launches (torch.profiler's device times, so the
    Python and launch overhead of the call is not counted; do_bench if the profiler saw none)."""
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    total = sum(e.self_device_time_total for e in prof.key_averages())
    if total <= 0:
        from triton.testing import do_bench
        return do_bench(fn, warmup=20, rep=100)
    return total / reps / 1e3


def timer(device: torch.device):
    """fn -> milliseconds per call: kernel time on a GPU, else the median of wall-clock repeats."""
    if device.type == "cuda":
        return kernel_ms

    def cpu(fn, reps=15):
        fn()
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts) * 1e3
    return cpu


def side_mlp(side: int) -> nn.Module:
    """A ReLU MLP side-side-side-10: two side² weights, the kernels' bench group."""
    return nn.Sequential(nn.Linear(side, side), nn.ReLU(), nn.Linear(side, side), nn.ReLU(), nn.Linear(side, 10))


def bench_group(device: torch.device, side: int):
    """The WA group of side_mlp(side) with random gradients:
    (plan, carriers, P_in, vs, gws, ws, bufs)."""
    torch.manual_seed(0)
    model = side_mlp(side)
    cm = compile_invariant(model, (torch.randn(2, side),), scale_activations=False).to(device)
    plan = cm.allocate
    c = plan.carrier_values(cm._carriers()).detach()
    vs = [cm.parameter_of(cm.allocated[i]).detach() for i in plan.wa]
    return (plan, c, plan.path_in(c), vs, [torch.randn_like(v) for v in vs], [v.clone() for v in vs],
            [torch.zeros_like(v) for v in vs])


def kernel_table(device: torch.device, side: int) -> str:
    """Markdown: the kernels on the bench_group tensors."""
    plan, c, p_in, vs, gws, ws, bufs = bench_group(device, side)
    layout, entries = plan.group(plan.wa).layout, sum(v.numel() for v in vs)
    nbytes = entries * vs[0].element_size()
    ms = timer(device)
    use = kernels.use_triton(vs[0])
    rows = [("copy (reference point)", 2, ms(lambda: [w.copy_(v) for w, v in zip(ws, vs)]), "torch copy_")]
    with kernels.mode("off"):
        rows.append(("WA", 2, ms(lambda: plan(p_in, c, *vs)), "PyTorch reference"))
        rows.append(("ICR", 3, ms(lambda: icr(plan, p_in, c, vs, gws, plan.wa)), "PyTorch reference"))
    if use:
        wa, icr_, step = kernels.wa, kernels.icr, kernels.gsgd_step
        rows += [("WA", 2, ms(lambda: wa.launch(vs, p_in, plan.M, c, layout, plan.n)), "Triton"),
                 ("ICR", 3, ms(lambda: icr_.launch(gws, vs, p_in, plan.M, c, layout, plan.n)), "Triton"),
                 ("G-SGD step: reduce", 2,
                  ms(lambda: step.launch_reduce(gws, ws, p_in, plan.M, c.numel(), layout, plan.n)), "Triton"),
                 ("G-SGD step: update (momentum)", 6, ms(lambda: step.launch_update(
                     gws, vs, bufs, ws, p_in, p_in, plan.M, c, layout, plan.n, 1e-9, 0.9, 0.0, False)), "Triton")]
    rows = [(*r, nbytes) for r in rows]
    if device.type == "cpu":
        rows += cpu_step_rows(side, ms)
    peak = peak_bandwidth(device)
    out = [f"Kernels on {len(vs)} tensors, {entries / 1e6:.1f}M entries ({vs[0].dtype}), {_device_name(device)}; "
           f"peak {'%.2f TB/s' % (peak / 1e12) if peak else 'unknown'}.", "",
           "| kernel | path | passes | ms | GB/s | % of peak |", "|---|---|---|---|---|---|"]
    for name, passes, t, path, nbytes in rows:
        gbs = passes * nbytes / (t * 1e-3) / 1e9
        share = f"{100 * gbs * 1e9 / peak:.0f}" if peak else "-"
        out.append(f"| {name} | {path} | {passes:g} | {t:.3f} | {gbs:.0f} | {share} |")
    return "\n".join(out)


def cpu_step_rows(side: int, ms) -> list:
    """The whole G-SGD optimizer step on CPU (the fused C++ step where it builds) beside
    torch.optim.SGD(foreach=True), no momentum, on the parameters of the same MLP."""
    import copy
    torch.manual_seed(0)
    model = side_mlp(side)
    twin = copy.deepcopy(model)
    for m in (model, twin):
        for p in m.parameters():
            p.grad = torch.randn_like(p)
    gsgd = GSGD(model, lr=1e-9, example_inputs=(torch.randn(2, side),))
    sgd = torch.optim.SGD(twin.parameters(), lr=1e-9, foreach=True)
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    t_gsgd = ms(gsgd.step)
    return [("SGD(foreach) step, no momentum (reference point)", 3, ms(sgd.step), "torch", nbytes),
            ("G-SGD step, no momentum: step + carriers + allocate", fused_passes(gsgd), t_gsgd,
             gsgd.backend, nbytes)]


def fused_passes(gsgd) -> float:
    """Tensor passes of the fused CPU step without momentum, per entry of the model's parameters
    (kernels/cpu_step.cpp): 5 over a tensor whose P_in depends on the carriers, 4 over one whose
    does not, 3 (SGD's) over a parameter outside the allocation."""
    plan, n = gsgd.plan, gsgd.plan.n
    params = gsgd.param_groups[0]["params"]
    allocated = [p for p in params if "v" in gsgd.state[p]]        # in plan order
    total = sum(p.numel() for p in params)
    passes = 3 * (total - sum(p.numel() for p in allocated))
    for i, p in enumerate(allocated):
        inp = plan.tensors[i].inp.reshape(-1).cpu()
        moves = bool((plan.path_root.cpu()[inp] < n).any())      # path_root[n] = n
        passes += (5 if moves else 4) * p.numel()
    return round(passes / total, 1)


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"


def _model_and_batch(device: torch.device):
    from .zoo import resnet18_like
    if device.type == "cuda":
        return resnet18_like().to(device), torch.randn(128, 3, 224, 224, device=device), "ResNet-18-shaped, batch 128, 224x224"
    model = nn.Sequential(nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(),
                          nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10))
    return model, torch.randn(256, 784), "MLP 784-1024x3-10, batch 256"


def step_table(device: torch.device, rounds: int, trace: str | None) -> str:
    """Markdown: a training step (and the optimizer step alone) with GSGD over SGD(foreach)."""
    import copy
    torch.manual_seed(0)
    model, x, what = _model_and_batch(device)
    y = torch.randint(0, 10, (x.shape[0],), device=device)
    models = {"SGD(foreach)": model, "GSGD": copy.deepcopy(model)}
    opts = {"SGD(foreach)": torch.optim.SGD(models["SGD(foreach)"].parameters(), lr=1e-3, momentum=0.9, foreach=True),
            "GSGD": GSGD(models["GSGD"], lr=1e-3, momentum=0.9, example_inputs=(x[:2],))}
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def fwd_bwd(k):
        opts[k].zero_grad(set_to_none=False)
        F.cross_entropy(models[k](x), y).backward()

    def timed(fn):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - t0

    for k in models:                                   # warm-up (kernel compilation, buffers)
        for _ in range(3):
            fwd_bwd(k)
            opts[k].step()
    whole = {k: [] for k in models}
    opt_only = {k: [] for k in models}
    for _ in range(rounds):
        for k in models:
            whole[k].append(timed(lambda: (fwd_bwd(k), opts[k].step())))
            opt_only[k].append(timed(opts[k].step))
    ratio = lambda d: statistics.median(b / a for a, b in zip(d["SGD(foreach)"], d["GSGD"]))
    med = lambda d, k: statistics.median(d[k]) * 1e3
    out = [f"Training step, {what}, momentum 0.9, {_device_name(device)}, {rounds} interleaved rounds.", "",
           "| what | SGD(foreach) ms | GSGD ms | GSGD / SGD |", "|---|---|---|---|",
           f"| whole step | {med(whole, 'SGD(foreach)'):.2f} | {med(whole, 'GSGD'):.2f} | {ratio(whole):.3f} |",
           f"| optimizer step alone | {med(opt_only, 'SGD(foreach)'):.2f} | {med(opt_only, 'GSGD'):.2f} | {ratio(opt_only):.3f} |"]
    out += ["", profiler_table(device, lambda: (fwd_bwd("GSGD"), opts["GSGD"].step()), trace)]
    return "\n".join(out)


def profiler_table(device: torch.device, step, trace: str | None, top: int = 12) -> str:
    """Markdown: torch.profiler's busiest kernels over 3 G-SGD training steps."""
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(3):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    if trace:
        prof.export_chrome_trace(trace)
    attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, attr, 0), reverse=True)[:top]
    total = sum(getattr(e, attr, 0) for e in prof.key_averages())
    out = [f"torch.profiler, 3 G-SGD training steps, busiest {'kernels' if device.type == 'cuda' else 'ops'} "
           f"by self {'device' if device.type == 'cuda' else 'CPU'} time" + (f"; chrome trace: {trace}" if trace else ""),
           "", "| name | calls | self ms | share |", "|---|---|---|---|"]
    for e in events:
        t = getattr(e, attr, 0)
        out.append(f"| {e.key[:70]} | {e.count} | {t / 1e3:.2f} | {100 * t / max(total, 1):.1f}% |")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m invariance_compiler profile", description=__doc__.split("\n")[0])
    p.add_argument("--side", type=int, default=None, help="side of the square weights (default 4096 on a GPU: "
                   "16.8M entries each; 1024 on CPU)")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds of the step comparison")
    p.add_argument("--trace", default=None, help="write a chrome trace of the profiled steps to this file")
    p.add_argument("--out", default=None, help="also write the markdown report to this file")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    parts = []
    if device.type != "cuda":
        parts.append("No GPU here: these are CPU figures (WA and ICR: the PyTorch reference path; the "
                     "G-SGD step: the fused C++ step). GPU figures (Triton kernels, % of peak HBM "
                     "bandwidth) need a machine with a CUDA GPU.")
    parts.append(kernel_table(device, args.side or (4096 if device.type == "cuda" else 1024)))
    parts.append(step_table(device, args.rounds or (20 if device.type == "cuda" else 10), args.trace))
    report = "\n\n".join(parts)
    print(report)
    if args.out:
        with open(args.out, "w") as f:
            f.write(report + "\n")
    return 0
