"""Step 1 of the pipeline: model -> torch.fx graph with the leaves our rules understand."""
from .tracer import TraceFailure, example_inputs_for, trace

__all__ = ["trace", "example_inputs_for", "TraceFailure"]
