"""Step 4 of the pipeline: compile_invariant emits a module without rescaling redundancy."""
from .module import InvariantModule, compile_invariant

__all__ = ["compile_invariant", "InvariantModule"]
