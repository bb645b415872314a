"""invariance_compiler: the positive rescaling symmetries of a PyTorch model, found by a compiler pass.

    import invariance_compiler as ic
    report = ic.analyze(model, example_inputs)
    print(report)

Pipeline: trace (torch.export) -> analyze (channel classes, generators) -> skeleton -> codegen -> kernels/optim;
equalize and rotate move a model along its group (rescalings, rotations) for quantization.
"""
from .analyze import Generator, SymmetryReport, SymmetryWarning, analyze
from .analyze import rules
from .analyze.rules import register_op, register_rule
from .codegen import InvariantModule, compile_invariant
from .equalize import equalize, fold_batchnorm
from .rotate import Rotation, rotate
from . import optim
from .trace import TraceFailure

__all__ = ["analyze", "compile_invariant", "InvariantModule", "SymmetryReport", "Generator",
           "SymmetryWarning", "register_rule", "register_op", "rules", "optim", "TraceFailure", "equalize",
           "fold_batchnorm", "rotate", "Rotation"]
__version__ = "0.1.0"
