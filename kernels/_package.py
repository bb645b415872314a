"""invariance_compiler.kernels' public names (kernels/__init__.py re-exports them)."""
from __future__ import annotations

from types import ModuleType

from . import gsgd_step, icr, wa
from .dispatch import current_mode, mode, triton_available, use_triton

__all__ = ["mode", "current_mode", "use_triton", "triton_available", "ops"]


def ops() -> ModuleType:
    """The Triton launchers, by op, and the registered custom ops themselves (`*_op`: the layout
    as its tensors and tiling numbers)."""
    out = ModuleType("invariance_compiler.kernels.ops")
    out.wa, out.icr = wa.launch, icr.launch
    out.gsgd_reduce, out.gsgd_update = gsgd_step.launch_reduce, gsgd_step.launch_update
    out.wa_op, out.icr_op = wa.wa_op, icr.icr_op
    out.gsgd_reduce_op, out.gsgd_update_op = gsgd_step.gsgd_reduce_op, gsgd_step.gsgd_update_op
    return out
