"""Triton kernels for weight allocation (WA), the inverse chain rule (ICR) and the fused G-SGD
step, each launched once per group of tensors (a pointer table), registered as custom ops
(`torch.ops.invariance_compiler.*`, with fake implementations, so torch.compile traces them).

Dispatch (`use_triton`): CUDA tensors go to Triton, CPU tensors to the PyTorch reference in
codegen/allocate.py, except GSGD's step on fp32 / fp64 CPU weights, which runs the fused C++ step
of cpu_step.cpp (`cpu_step`; built on first use, PyTorch where no compiler works). The one switch
is the context manager `mode`, or else the environment variable IC_KERNELS (read at each use):
    auto       (default) as above;
    interpret  CPU tensors run the Triton kernels too, under Triton's interpreter (this is how CI
               tests them): start Python with TRITON_INTERPRET=1 (Triton reads it when the
               kernels are defined, so it cannot be switched on later);
    off        the PyTorch reference everywhere.
Triton is imported on first use only."""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
from types import ModuleType

import torch

__all__ = ["mode", "current_mode", "use_triton", "triton_available", "ops", "cpu_step"]

_mode: str | None = None             # set by `mode`; None: IC_KERNELS
_ops: ModuleType | None = None
_interpreted = False


def current_mode() -> str:
    return _check_mode(_mode if _mode is not None else os.environ.get("IC_KERNELS", "auto"))


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
        if m == "interpret" and triton_available():
            ops()                        # says now, not at the first kernel, when it cannot work
        yield
    finally:
        _mode = old


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """Whether Triton is installed (found without importing it: see ops)."""
    return importlib.util.find_spec("triton") is not None


def use_triton(t: torch.Tensor) -> bool:
    """Whether tensors like `t` go to the Triton kernels."""
    m = current_mode()
    if m == "off" or not (t.is_cuda or (m == "interpret" and t.device.type == "cpu")):
        return False
    if not triton_available():
        return False
    ops()
    return _interpreted == (not t.is_cuda)


def ops() -> ModuleType:
    """The kernel modules, imported (and their kernels defined) on first use. Without a GPU they
    are defined for Triton's interpreter."""
    global _ops, _interpreted
    if _ops is None:
        if current_mode() == "interpret" and not torch.cuda.is_available() and \
                os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError("kernels: interpret mode runs Triton's interpreter, which Triton reads "
                               "from TRITON_INTERPRET=1 when the kernels are defined; start Python "
                               "with TRITON_INTERPRET=1 set (or use mode 'auto' / 'off')")
        _interpreted = os.environ.get("TRITON_INTERPRET") == "1"
        from . import gsgd_step, icr, wa
        _ops = ModuleType("invariance_compiler.kernels.ops")
        _ops.wa, _ops.icr = wa.wa, icr.icr
        _ops.gsgd_reduce, _ops.gsgd_update = gsgd_step.gsgd_reduce, gsgd_step.gsgd_update
        # the registered custom ops themselves (the layout as tensors and tiling numbers)
        _ops.wa_op, _ops.icr_op = wa.wa_op, icr.icr_op
        _ops.gsgd_reduce_op, _ops.gsgd_update_op = gsgd_step.gsgd_reduce_op, gsgd_step.gsgd_update_op
    return _ops


def cpu_step(plan, tensors, cached=None):
    """The fused C++ G-SGD step (kernels/cpu.py) of `plan` for CPU `tensors` (`cached`, a step
    this returned before for the same plan, where it fits), or None: the PyTorch path."""
    if current_mode() != "auto":
        return None
    from .cpu import cpu_step as build
    return build(plan, tensors, cached)
