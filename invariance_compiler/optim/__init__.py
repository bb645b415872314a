"""Symmetry-aware optimizers whose structure comes from a SymmetryReport."""
from .fgsgd import FGSGD
from .gsgd import GSGD
from .manifold import SM, UN, balanced_init_
from .psi import PSISGD

__all__ = ["FGSGD", "GSGD", "PSISGD", "SM", "UN", "balanced_init_"]
