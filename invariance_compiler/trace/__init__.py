"""Step 1 of the pipeline: model -> torch.export graph of ATen ops (DESIGN §3.2)."""
from .capture import (Captured, TraceFailure, capture, capture_kwargs, example_call, example_inputs_for,
                      preserved)

__all__ = ["capture", "capture_kwargs", "Captured", "example_call", "example_inputs_for", "preserved",
           "TraceFailure"]
