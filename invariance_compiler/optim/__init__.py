"""Symmetry-aware optimizers whose structure comes from a SymmetryReport."""
from .gsgd import GSGD
from .manifold import SM, UN, balanced_init_
from .psi import PSISGD

__all__ = ["GSGD", "PSISGD", "SM", "UN", "balanced_init_"]
