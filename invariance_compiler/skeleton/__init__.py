"""Step 3 of the pipeline: which entries to fix (K), which carry scales (J), and the constants of
the allocation (DESIGN §3.4-3.6)."""
from .basis import basis_paths
from .canonical import balance, typical_scales, fix_to
from .select import Skeleton, build_skeleton, check_finite

__all__ = ["Skeleton", "build_skeleton", "check_finite", "balance", "typical_scales", "fix_to", "basis_paths"]
