"""Step 2 of the pipeline: the rescaling group of a captured model (DESIGN §3.1-3.3)."""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn as nn

from ..trace import capture, example_call, preserved
from .inert import prove_inert
from .interpreter import SymmetryPass, SymmetryWarning
from .report import Generator, SymmetryReport

__all__ = ["analyze", "SymmetryReport", "Generator", "SymmetryWarning"]


def analyze(model: nn.Module, example_inputs: Any = None, example_kwargs: Optional[dict] = None
            ) -> SymmetryReport:
    """Find the positive rescaling symmetries of `model` on `example_inputs` (a tensor or a tuple
    of positional arguments) and `example_kwargs`. The model is left untouched (its buffers, e.g.
    BatchNorm running statistics, and the global RNG state are restored)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"analyze expects a torch.nn.Module, got {type(model).__name__}")
    params = dict(model.named_parameters())
    if not params:
        raise ValueError(f"{type(model).__name__} has no parameters: there is nothing to rescale. "
                         f"Analyze the model after its layers are created.")
    example_inputs, example_kwargs = example_call(model, example_inputs, example_kwargs)
    rng = torch.random.get_rng_state()
    with preserved(model):
        captured = capture(model, example_inputs, example_kwargs)
        flat = captured.flat_inputs(model, example_inputs, example_kwargs)
        spass = SymmetryPass(captured, params, _user_outputs(captured))
        torch.random.set_rng_state(rng)                   # the capture drew dropout masks
        ctx = spass.analyse(*flat)
        inert = prove_inert(captured, params)
    read = {captured.params[n.name] for n in captured.gm.graph.nodes
            if n.op == "placeholder" and n.name in captured.params and n.users}
    return SymmetryReport(model, captured, ctx, spass.unknown, inert, read)


def _user_outputs(captured) -> set:
    sig = captured.signature
    kinds = (torch.export.graph_signature.OutputKind.USER_OUTPUT,
             torch.export.graph_signature.OutputKind.USER_INPUT_MUTATION)
    return {s.arg.name for s in sig.output_specs if s.kind in kinds and hasattr(s.arg, "name")}
