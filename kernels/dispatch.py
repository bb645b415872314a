"""Which backend runs an op: CUDA tensors go to Triton; fp32 / fp64 CPU tensors to cpu_step.cpp's
fused passes (cpu.py: GSGD's step, and the gspace module's WA and ICR outside torch.compile);
other CPU tensors, and CPU tensors where no compiler works, to the op's PyTorch reference. The one
switch is the context manager `mode`, or else the environment variable IC_KERNELS (read at each use):
    auto       (default) as above;
    interpret  CPU tensors run the Triton kernels too, under Triton's interpreter (this is how CI
               tests them): start Python with TRITON_INTERPRET=1 (Triton reads it when it is
               imported, with invariance_compiler, so it cannot be switched on later);
    off        the PyTorch references everywhere."""
from __future__ import annotations

import contextlib
import os

import torch

from .common import INTERPRETED, triton

__all__ = ["mode", "current_mode", "use_triton", "triton_available"]

_mode: str | None = None             # set by `mode`; None: IC_KERNELS


def current_mode() -> str:
    m = _mode if _mode is not None else os.environ.get("IC_KERNELS", "auto")
    if m not in ("auto", "interpret", "off"):
        raise ValueError(f"IC_KERNELS / kernels.mode: expected 'auto', 'interpret' or 'off', got {m!r}")
    return m


@contextlib.contextmanager
def mode(m: str):
    """Run a block with kernel dispatch `m` ('auto', 'interpret' or 'off')."""
    global _mode
    old, _mode = _mode, m
    try:
        current_mode()
        if m == "interpret":
            _check_interpreter()         # says now, not at the first kernel, when it cannot work
        yield
    finally:
        _mode = old


def triton_available() -> bool:
    """Whether Triton is installed (and so the kernels defined)."""
    return triton is not None


def _check_interpreter() -> None:
    if triton is not None and not INTERPRETED and not torch.cuda.is_available():
        raise RuntimeError("kernels: interpret mode runs Triton's interpreter, which Triton reads from "
                           "TRITON_INTERPRET=1 when it is imported; start Python with TRITON_INTERPRET=1 "
                           "set (or use mode 'auto' / 'off')")


def use_triton(t: torch.Tensor) -> bool:
    """Whether tensors like `t` go to the Triton kernels."""
    m = current_mode()
    if m == "off" or triton is None:
        return False
    if t.is_cuda:
        return not INTERPRETED
    if m == "interpret" and t.device.type == "cpu":
        _check_interpreter()             # raises where there is no GPU and no interpreter
        return INTERPRETED               # (with a GPU, CPU tensors keep the reference)
    return False
