"""Symmetry-aware optimizers whose structure comes from a SymmetryReport."""
from .gsgd import GSGD

__all__ = ["GSGD"]
