"""Step 2 of the pipeline: the rescaling group of a captured model (DESIGN §3.1-3.3)."""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn as nn

from ..trace import capture, capture_kwargs, example_inputs_for
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
    if example_inputs is None and not example_kwargs:
        example_inputs = example_inputs_for(model)
    elif example_inputs is None:
        example_inputs = ()
    elif isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    example_inputs = tuple(example_inputs)
    example_kwargs = capture_kwargs(model, example_kwargs)   # use_cache=False where the forward takes it
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    rng = torch.random.get_rng_state()
    try:
        captured = capture(model, example_inputs, example_kwargs)
        flat = captured.flat_inputs(model, example_inputs, example_kwargs)
        spass = SymmetryPass(captured, params, _user_outputs(captured))
        torch.random.set_rng_state(rng)
        ctx = spass.analyse(*flat)
        inert = prove_inert(captured, params)
    finally:
        with torch.no_grad():
            for n, b in model.named_buffers():
                b.copy_(buffers[n])
        torch.random.set_rng_state(rng)
    read = {captured.params[n.name] for n in captured.gm.graph.nodes
            if n.op == "placeholder" and n.name in captured.params and n.users}
    return SymmetryReport(model, captured, ctx, spass.unknown, inert, read)


def _user_outputs(captured) -> set:
    sig = captured.signature
    kinds = (torch.export.graph_signature.OutputKind.USER_OUTPUT,
             torch.export.graph_signature.OutputKind.USER_INPUT_MUTATION)
    return {s.arg.name for s in sig.output_specs if s.kind in kinds and hasattr(s.arg, "name")}
