"""Triton kernels for weight allocation (WA), the inverse chain rule (ICR) and the fused G-SGD
step, each launched once per group of tensors (a pointer table), registered as custom ops
(`torch.ops.invariance_compiler.*`, with fake implementations, so torch.compile traces them).

Dispatch (`use_triton`): CUDA tensors go to Triton, CPU tensors to the PyTorch reference in
codegen/allocate.py, except GSGD's step on fp32 / fp64 CPU weights, which runs the fused C++ step
of cpu_step.cpp (`cpu_step`; built on first use, PyTorch where no compiler works). The one switch
is the environment variable IC_KERNELS (or the context manager `mode`):
    auto       (default) as above;
    interpret  CPU tensors run the Triton kernels too, under TRITON_INTERPRET=1 (this is how CI
               tests them; set it before the first kernel call, and on a machine with a GPU
               start Python with TRITON_INTERPRET=1 as well);
    off        the PyTorch reference everywhere.
Triton is imported on first use only."""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import sys
from types import ModuleType

import torch

__all__ = ["mode", "use_triton", "ops", "cpu_step"]

_mode = os.environ.get("IC_KERNELS", "auto")
_ops: ModuleType | None = None
_interpreted = False


def _check_mode(m: str) -> str:
    if m not in ("auto", "interpret", "off"):
        raise ValueError(f"IC_KERNELS / kernels.mode: expected 'auto', 'interpret' or 'off', got {m!r}")
    return m


@contextlib.contextmanager
def mode(m: str):
    """Run a block with kernel dispatch `m` ('auto', 'interpret' or 'off')."""
    global _mode
    old, _mode = _mode, _check_mode(m)
    try:
        yield
    finally:
        _mode = old


@functools.lru_cache(maxsize=None)
def _triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None      # without importing it (see ops)


def use_triton(t: torch.Tensor) -> bool:
    """Whether tensors like `t` go to the Triton kernels."""
    m = _check_mode(_mode)
    if m == "off" or not (t.is_cuda or (m == "interpret" and t.device.type == "cpu")):
        return False
    if not _triton_available():
        return False
    ops()
    return _interpreted == (not t.is_cuda)


def ops() -> ModuleType:
    """The kernel modules, imported (and their kernels defined) on first use. Without a GPU they
    are defined for Triton's interpreter."""
    global _ops, _interpreted
    if _ops is None:
        if _mode == "interpret" and not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
            if "triton" in sys.modules:     # its own jit functions (tl.sum...) were built compiled
                raise RuntimeError("kernels: interpret mode needs TRITON_INTERPRET=1 before triton is "
                                   "imported; start Python with TRITON_INTERPRET=1 set")
            os.environ["TRITON_INTERPRET"] = "1"
        _interpreted = os.environ.get("TRITON_INTERPRET") == "1"
        from . import gsgd_step, icr, wa
        _ops = ModuleType("invariance_compiler.kernels.ops")
        _ops.wa, _ops.icr = wa.wa, icr.icr
        _ops.gsgd_reduce, _ops.gsgd_update = gsgd_step.gsgd_reduce, gsgd_step.gsgd_update
    return _ops


def cpu_step(plan, tensors, cached=None):
    """The fused C++ G-SGD step (kernels/cpu.py) of `plan` for CPU `tensors` (`cached`, a step
    this returned before for the same plan, where it fits), or None: the PyTorch path."""
    if _check_mode(_mode) != "auto":
        return None
    from .cpu import cpu_step as build
    return build(plan, tensors, cached)
