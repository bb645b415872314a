"""Cross-layer equalization on any graph (Nagel et al. 2019, "Data-Free Quantization"): move the
model along its rescaling orbit so that, for every rescale class, the largest |w| among the entries
that produce the class equals the largest |w| among the entries that consume it. DFQ's
s = sqrt(r_consumer / r_producer) for one pair of layers, here for every class of the report at
once (residual streams, concatenation, depthwise convolutions, attention's value/output pairs),
iterated to a fixed point, since an entry produces one class and consumes another. The move is
`report.act`: the function is unchanged.

Ranges are those of the tensors that per-tensor quantization rounds (conv and linear weights,
embeddings: dim >= 2), read on compact channel grids (a conv's (C_out, C_in/g) pairs: the taps of a
pair scale alike, so their maximum is the pair's). Biases and 1-D parameters (norm affines,
LayerScale) stay in float, as DFQ keeps them: they move with their class but have no range. A
class whose producers are all such parameters (a LayerNorm's γ in front of q, k, v) puts its
whole scale there: its consumers' ranges are brought to one value (their geometric mean), which is
what per-tensor rounding of the consumers wants."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.nn as nn

from ..analyze import SymmetryReport, analyze
from ..skeleton import balance, build_skeleton, typical_scales
from ..trace import example_call
from .quant import outputs_on, relative_change
from .fold import fold_batchnorm

__all__ = ["equalize", "Equalization"]

NEG = -float("inf")


@dataclass
class Equalization:
    """What `equalize` did: the model (moved in place), the log-scales λ it acted with (E λ), and per
    equalized class the producers' and consumers' ranges before and after."""
    model: nn.Module
    report: SymmetryReport
    log_scales: torch.Tensor                     # (num_generators,), float64
    classes: torch.Tensor                        # generator columns equalized
    before: torch.Tensor                         # (len(classes), 2): producer, consumer range; for a
    after: torch.Tensor                          # class in float_producers the producer column is
                                                 # the one range its consumers are brought to
    iterations: int
    float_producers: torch.Tensor = None         # those of `classes` whose producers stay in float
    folded: list = field(default_factory=list)   # (layer, batchnorm) pairs folded first
    normalize_kept: bool = False                 # normalize classes left where they were: moving
                                                 # them changed the outputs by more than EPS_TOLERANCE

    @property
    def imbalance(self) -> float:
        """max over classes of |log(r_producer / r_consumer)| after equalization (0: balanced)."""
        if not self.classes.numel():
            return 0.0
        return float((self.after[:, 0].log() - self.after[:, 1].log()).abs().max())

    def __str__(self) -> str:
        def spread(r):
            ratio = (r[:, 0] / r[:, 1]).log().abs().exp() if r.numel() else torch.ones(1)
            return f"median {float(ratio.median()):.3g}, max {float(ratio.max()):.3g}"
        lines = [f"equalized {self.classes.numel()} classes in {self.iterations} iterations "
                 f"({self.float_producers.numel()} of them with their producers in float)"]
        if self.folded:
            lines.append(f"folded {len(self.folded)} BatchNorm(s): " +
                         ", ".join(f"{b} -> {a}" for a, b in self.folded))
        lines.append(f"producer/consumer range ratio before: {spread(self.before)}")
        lines.append(f"producer/consumer range ratio after:  {spread(self.after)}")
        return "\n".join(lines)


def _grids(report: SymmetryReport, model: nn.Module, n: int):
    """Per parameter with a plain class on some side: (consumed column, produced column, log max|w|
    per compact cell, kept in float?) with column -1 mapped to n."""
    out = []
    for name, p in model.named_parameters():
        if report.is_inert(name) or not report.has_classes(name):
            continue
        inp, prod = report.sides(name)
        if not bool((inp >= 0).any() or (prod >= 0).any()):
            continue
        grid = torch.broadcast_shapes(inp.shape, prod.shape)
        a = p.detach().abs().to(torch.float64)
        dims = [d for d in range(a.dim()) if grid[d] == 1 and a.shape[d] > 1]
        if dims:
            a = a.amax(dims, keepdim=True)
        a = a.expand(grid).reshape(-1).log()
        out.append((torch.where(inp < 0, n, inp).expand(grid).reshape(-1),
                    torch.where(prod < 0, n, prod).expand(grid).reshape(-1), a,
                    p.dim() < 2 or name in report.additive))
    return out


def _typical(report: SymmetryReport, model: nn.Module, n: int) -> torch.Tensor:
    """(n + 1,) the plain classes' log-scales of the orbit's typical-scale point (skeleton.typical_scales:
    λ*(g·A) = λ*(A) − log g), 0 in the last slot."""
    weights = {k: p.detach() for k, p in model.named_parameters()}
    lam = torch.zeros(n + 1, dtype=torch.float64)
    if n:
        lam[:n] = typical_scales(report, build_skeleton(report, weights, carriers=False), weights)[:n]
    return lam


def _ranges(grids, lam: torch.Tensor, n: int) -> torch.Tensor:
    """(n + 1, 2) log range of each column's producers and consumers under log-scales lam."""
    r = torch.full((2, n + 1), NEG, dtype=torch.float64)
    for inp, prod, logw, in_float in grids:
        if in_float:
            continue
        moved = logw + lam[prod] - lam[inp]
        r[0].scatter_reduce_(0, prod, moved, "amax")
        r[1].scatter_reduce_(0, inp, moved, "amax")
    return r.t()


def _activation_ranges(model: nn.Module, report: SymmetryReport, n: int, calibration) -> torch.Tensor:
    """(n + 1,) log max|x| of each class's activation over the calibration batches, read at the
    inputs of the Linear and conv modules that consume it (-inf: not seen)."""
    seen = torch.full((n + 1,), NEG, dtype=torch.float64)
    hooks = []
    for mod_name, mod in model.named_modules():
        name = f"{mod_name}.weight" if mod_name else "weight"
        if not isinstance(mod, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)) or name not in report.param_shapes:
            continue
        inp, _ = report.sides(name)
        linear = isinstance(mod, nn.Linear)
        if not linear and mod.groups > 1:
            continue                                 # grouped: a column is not one input channel
        cols = inp.reshape(-1) if linear else inp.reshape(inp.shape[1])
        cols = torch.where(cols < 0, n, cols)

        def hook(m, args, _out, cols=cols, linear=linear):
            x = args[0].detach().abs().to(torch.float64)
            per = x.reshape(-1, x.shape[-1]).amax(0) if linear else x.transpose(0, 1).reshape(x.shape[1], -1).amax(1)
            seen.scatter_reduce_(0, cols.expand(per.shape), per.log(), "amax")
        hooks.append(mod.register_forward_hook(hook))
    try:
        with torch.no_grad():
            for batch in calibration:
                args, kwargs = (batch, {}) if not isinstance(batch, dict) else ((), batch)
                model(*(args if isinstance(args, tuple) else (args,)), **kwargs)
    finally:
        for h in hooks:
            h.remove()
    seen[n] = NEG
    return seen


def equalize(model: nn.Module, example_inputs: Any = None, example_kwargs: Optional[dict] = None, *,
             objective: str = "range", iterations: int = 1000, tol: float = 1e-9,
             fold_bn: bool = False, calibration=None, alpha: float = 0.5) -> Equalization:
    """Move `model` along its rescaling orbit, in place, so that its weights quantize well with one
    scale per tensor; its function does not change.

    objective: "range" (DFQ: for every rescale class the largest |w| that produces it equals the
               largest |w| that consumes it, iterated to a fixed point) or "l2" (the point of
               least Σ‖w‖²: skeleton.balance).
    fold_bn:   first fold eval-mode BatchNorm into the conv/linear before it (the model must be in
               eval mode), so that the classes run through the folded layers.
    calibration: (objective "range") batches of inputs (tensors, tuples of positional arguments, or
               dicts of keyword arguments): the classes whose producers stay in float (a LayerNorm's
               or RMSNorm's γ in front of linear layers) then migrate scale between activations and
               weights as SmoothQuant does, s = max|x|^alpha / max|w|^(1 - alpha) per channel, so that
               activations as well as weights quantize per tensor (alpha = 0.5: equal ranges)."""
    if objective not in ("range", "l2"):
        raise ValueError(f"equalize: objective must be 'range' or 'l2', got {objective!r}")
    folded = fold_batchnorm(model, example_inputs, example_kwargs) if fold_bn else []
    report = analyze(model, example_inputs, example_kwargs)
    n = report.num_simple
    rescale = torch.tensor([kind == "rescale" for kind in report.simple_kinds] + [False])
    grids = _grids(report, model, n)
    start = _ranges(grids, torch.zeros(n + 1, dtype=torch.float64), n)
    # the iteration starts from the orbit's typical-scale point, not from where the model happens to
    # be: DFQ's fixed point is not unique (max-plus conditions), so its start decides which one, and
    # a start that is the same for every point of the orbit makes equalize(g·A) = equalize(A).
    lam = _typical(report, model, n)
    both = rescale & torch.isfinite(start).all(dim=1)            # producers and consumers: equalizable
    both[n] = False
    # producers only in float (or none rounded): the class's scale goes there
    lone = rescale & torch.isfinite(start[:, 1]) & ~torch.isfinite(start[:, 0])
    lone[n] = False
    # normalize classes with rounded producers: a normaliser absorbs their scale and nothing
    # consumes it, so their producers go to the same range as the float-produced classes' consumers
    normal = ~rescale & torch.isfinite(start[:, 0])
    normal[n] = False
    typical = _ranges(grids, lam, n)
    ends = torch.cat([typical[lone, 1], typical[normal, 0]])
    target = ends.mean() if ends.numel() else 0.0
    smooth = torch.zeros(n + 1, dtype=torch.bool)
    if calibration is not None and objective == "range":
        act = _activation_ranges(model, report, n, calibration)
        smooth = lone & torch.isfinite(act)
        # x moves by e^λ, its consumers by e^-λ: λ = -log s = (1 - alpha) log max|w| - alpha log max|x|
        lam[smooth] = ((1 - alpha) * start[:, 1] - alpha * act)[smooth]
        lone = lone & ~smooth
    normalize_kept = False
    steps = 0
    if objective == "l2":
        full = balance(report, model)
        lam[:n] = full[:n]
    else:
        start_lam = lam.clone()
        lam, steps = _iterate(grids, lam, n, both, lone, normal, target, iterations, tol)
        full = torch.zeros(report.num_generators, dtype=torch.float64)
        full[:n] = lam[:n]
        moved = bool(normal.any()) and bool(lam[normal].abs().max() > 0)
        if moved:                                   # a normaliser's eps may see the move: check
            args, kwargs = example_call(model, example_inputs, example_kwargs)
            before, saved = outputs_on(model, args, kwargs), [p.detach().clone() for p in model.parameters()]
        report.act(model, full)
        if moved and relative_change(before, outputs_on(model, args, kwargs)) > EPS_TOLERANCE:
            with torch.no_grad():                   # keep the normalize classes where they are
                for p, v in zip(model.parameters(), saved):
                    p.copy_(v)
            start_lam[normal] = 0.0
            lam, steps = _iterate(grids, start_lam, n, both, lone, torch.zeros_like(normal), target,
                                  iterations, tol)
            full = torch.zeros(report.num_generators, dtype=torch.float64)
            full[:n] = lam[:n]
            report.act(model, full)
            normalize_kept = True
    after = _ranges(grids, lam, n)
    for r in (start, after):
        r[lone, 0] = target
    if bool(smooth.any()):                 # activation against weight range, as SmoothQuant balances
        start[smooth, 0] = act[smooth]
        after[smooth, 0] = act[smooth] + lam[smooth]
        lone = lone | smooth
    idx = (both | lone).nonzero().reshape(-1)
    return Equalization(model, report, full, idx, start[idx].exp(), after[idx].exp(), steps,
                        lone.nonzero().reshape(-1), folded, normalize_kept)


# A move of a normalize class changes what a normaliser's eps adds to its input's mean square:
# nothing when eps is negligible (CNNs' GroupNorm on O(1) activations: 1e-6 of the output), 6e-4
# of the logits on a Llama at transformers' initialisation (embeddings of std 0.02, eps 1e-6)
EPS_TOLERANCE = 1e-5


def _iterate(grids, lam, n, both, lone, normal, target, iterations, tol):
    """DFQ's fixed point from `lam`: (λ, iterations)."""
    steps = 0
    for steps in range(1, iterations + 1):
        r = _ranges(grids, lam, n)
        gap = torch.where(both, r[:, 1] - r[:, 0], 0.0)
        gap = torch.where(lone, 2 * (r[:, 1] - target), gap)     # one side moves: twice the step
        gap = torch.where(normal, 2 * (target - r[:, 0]), gap)
        # DFQ's step is gap / 2; 0.8 of it, because a class's producers are its upstream
        # neighbour's consumers and moving every class by its full step at once can oscillate
        # (layerscale in the zoo did); 0.5 of it converged 2-3x slower
        lam = lam + 0.4 * gap
        if float(gap.abs().max()) <= tol:
            break
    return lam, steps
