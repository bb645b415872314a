"""Per-tensor symmetric weight quantization (what equalization is for), weight-and-activation fake
quantization of every Linear (what rotation is for) and the signal-to-noise ratio of a quantized
model's outputs: the yardsticks of `benchmarks/equalize_table.py`, `benchmarks/rotate_table.py`
and the tests."""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

from ..trace import preserved

__all__ = ["quantize_weights_", "sqnr_db", "fake_quantized", "outputs_on", "relative_change"]


@torch.no_grad()
def quantize_weights_(model: nn.Module, bits: int = 8) -> nn.Module:
    """Round every weight tensor (dim >= 2: conv and linear weights, embeddings) to `bits` bits with
    one symmetric scale per tensor, max|w| / (2^(bits-1) - 1), in place; biases and 1-D parameters
    stay in float, as DFQ keeps them. Returns the model."""
    levels = 2 ** (bits - 1) - 1
    for p in model.parameters():
        if p.dim() >= 2 and p.is_floating_point():
            scale = p.abs().max() / levels
            if scale > 0:
                p.copy_(torch.round(p / scale) * scale)
    return model


def sqnr_db(reference: torch.Tensor, other: torch.Tensor) -> float:
    """10·log10(‖reference‖² / ‖reference - other‖²)."""
    noise = (reference - other).double().pow(2).sum()
    return float(10 * torch.log10(reference.double().pow(2).sum() / noise.clamp(min=1e-300)))


def _round(x: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Symmetric round-to-nearest with one scale per slice along `dim` (max |x| / (2^(bits-1) - 1))."""
    levels = 2 ** (bits - 1) - 1
    scale = x.abs().amax(dim=dim, keepdim=True).clamp(min=1e-12) / levels
    return torch.round(x / scale).clamp(-levels, levels) * scale


def fake_quantized(model: nn.Module, wbits: int, abits: int) -> nn.Module:
    """A copy of `model` whose every nn.Linear has its weight rounded per output channel to `wbits`
    and its input rounded per token to `abits` (symmetric round-to-nearest, as QuaRot's RTN
    baselines)."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear):
                m.weight.copy_(_round(m.weight, wbits, 1))
                m.register_forward_pre_hook(lambda mod, a: (_round(a[0], abits, -1), *a[1:]))
    return model


def outputs_on(model: nn.Module, args: tuple, kwargs: dict) -> list:
    """The model's floating outputs on one example, with the same dropout masks every time and its
    buffers (BatchNorm's running statistics) and the RNG left as they were."""
    with preserved(model), torch.no_grad():
        torch.manual_seed(0)
        out = model(*args, **kwargs)
    return [t.detach().clone() for t in torch.utils._pytree.tree_leaves(out)
            if isinstance(t, torch.Tensor) and t.is_floating_point()]


def relative_change(before: list, after: list) -> float:
    """max over outputs of max |a - b| / max |a|."""
    worst = 0.0
    for a, b in zip(before, after):
        scale = float(a.abs().max()) or 1.0
        worst = max(worst, float((a - b).abs().max()) / scale)
    return worst
