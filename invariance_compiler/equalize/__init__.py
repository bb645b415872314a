"""Equalization for quantization: the rescaling group that G-SGD removes, used to even out the
per-channel weight ranges before per-tensor quantization (Nagel et al. 2019)."""
from .fold import fold_batchnorm
from .quant import quantize_weights_, sqnr_db
from .ranges import Equalization, equalize

__all__ = ["equalize", "Equalization", "fold_batchnorm", "quantize_weights_", "sqnr_db"]
