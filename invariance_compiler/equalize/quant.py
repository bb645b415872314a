"""Per-tensor symmetric weight quantization (what equalization is for) and the signal-to-noise
ratio of a quantized model's outputs: the yardsticks of `benchmarks/equalize_table.py` and the tests."""
from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["quantize_weights_", "sqnr_db"]


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
