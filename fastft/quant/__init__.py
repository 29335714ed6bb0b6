"""Quantized weights: NF4 in bitsandbytes' layout (`quantize_nf4`, `NF4Weight`)."""
from fastft.quant.nf4_weight import NF4Weight, quantize_nf4

__all__ = ["NF4Weight", "quantize_nf4"]
