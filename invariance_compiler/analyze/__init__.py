"""Step 2 of the pipeline: the rescaling group of a traced model (DESIGN §3.1-3.3)."""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn as nn

from ..trace import example_inputs_for, trace
from .interpreter import SymmetryPass, SymmetryWarning
from .report import Generator, SymmetryReport

__all__ = ["analyze", "SymmetryReport", "Generator", "SymmetryWarning"]


def analyze(model: nn.Module, example_inputs: Any = None, *,
            concrete_args: Optional[dict[str, Any]] = None) -> SymmetryReport:
    """Find the positive rescaling symmetries of `model`. The model is left untouched (its buffers,
    e.g. BatchNorm running statistics, and the global RNG state are restored)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"analyze expects a torch.nn.Module, got {type(model).__name__}")
    params = dict(model.named_parameters())
    if not params:
        raise ValueError(f"{type(model).__name__} has no parameters: there is nothing to rescale. "
                         f"Analyze the model after its layers are created.")
    gm = trace(model, concrete_args)
    if example_inputs is None:
        example_inputs = example_inputs_for(gm, model)
    elif isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    rng = torch.random.get_rng_state()
    try:
        ctx = (p := SymmetryPass(gm, params)).analyse(*example_inputs)
    finally:
        with torch.no_grad():
            for n, b in model.named_buffers():
                b.copy_(buffers[n])
        torch.random.set_rng_state(rng)
    return SymmetryReport(model, gm, ctx, p.unknown)
