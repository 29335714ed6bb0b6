"""Rounding fp32 to a storage dtype the way the GPU does, also under the interpreter.

The interpreter converts fp32 → bf16 by truncation; the GPU rounds to nearest even. Kernels whose outputs are
compared with torch's bf16 rounding (the layer ops) cast through `round_to`, which under the interpreter rounds
by hand (bit arithmetic on the fp32 pattern) and on the GPU is a plain cast.
"""
from __future__ import annotations

import torch

from fastft.kernels.runtime import INTERPRET, triton

import triton.language as tl


def emulate_rtne(dtype: torch.dtype) -> bool:
    """The constexpr `round_to` takes: true only for bf16 under the interpreter."""
    return INTERPRET and dtype == torch.bfloat16


@triton.jit
def round_to(v, dtype: tl.constexpr, EMULATE_RTNE: tl.constexpr):
    """v (fp32) → dtype, round to nearest even (finite values)."""
    if EMULATE_RTNE:
        bits = v.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        v = bits.to(tl.float32, bitcast=True)
    return v.to(dtype)
