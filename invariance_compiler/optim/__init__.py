"""Symmetry-aware optimizers whose structure comes from a SymmetryReport."""
from .gsgd import GSGD
from .psi import PSISGD, psi_groups

__all__ = ["GSGD", "PSISGD", "psi_groups"]
