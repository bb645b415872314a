"""The kernels for weight allocation (WA), the inverse chain rule (ICR) and the fused G-SGD step.
One file per op holds its Triton kernel (launched once per group of tensors through a pointer
table, registered as a custom op with a fake implementation so torch.compile traces it), its
PyTorch reference and the dispatch between them (dispatch.py: Triton for CUDA tensors, the
reference on CPU, GSGD's fused C++ step of cpu.py where it applies; `mode` switches). The ops read
one typed layout (layout.py). Nothing here imports the compiler: callers pass tensors and layouts.
Each op's file has its launcher (`wa.launch`, `icr.launch`, `gsgd_step.launch_reduce` /
`launch_update`: the layout record) and the registered custom op (`wa.wa_op`...: its tensors and
tiling numbers)."""
from __future__ import annotations

import sys

if __name__ == "kernels":
    # Found as a top-level `kernels`: the checkout's root is on sys.path (python -m / -c run there),
    # and this folder shadows the PyPI package of that name, which transformers requires. Hand the
    # import over to that package (or fail as if this folder were not there); ours is only ever
    # invariance_compiler.kernels.
    import importlib.util
    from pathlib import Path
    _here = Path(__file__).resolve().parent.parent
    _path = [p for p in sys.path if Path(p or ".").resolve() != _here]
    _spec = importlib.machinery.PathFinder.find_spec("kernels", _path)
    if _spec is None:
        raise ModuleNotFoundError("No module named 'kernels' (the folder kernels/ of invariance_compiler's "
                                  "checkout is invariance_compiler.kernels)", name="kernels")
    _real = importlib.util.module_from_spec(_spec)
    sys.modules["kernels"] = _real
    _spec.loader.exec_module(_real)
else:
    from . import gsgd_step, icr, wa                                              # noqa: F401
    from .dispatch import current_mode, mode, triton_available, use_triton       # noqa: F401
    __all__ = ["mode", "current_mode", "use_triton", "triton_available"]
