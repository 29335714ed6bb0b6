"""Host NF4 quantize / dequantize from the optional compiled extension (csrc/nf4_cpu.cpp, OpenMP).

Bit-identical to the torch reference in fastft/quant/nf4_format.py, faster and without float temporaries,
which matters when a checkpoint is quantized layer by layer while it loads. `available()` is False when
fastft._C was not built; callers then use the torch reference.
"""
from __future__ import annotations

import torch

try:
    from fastft import _C
except ImportError:  # the extension is optional
    _C = None

_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def available() -> bool:
    return _C is not None and hasattr(_C, "nf4_quantize_cpu")


def quantize(x: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed uint8 [(n+1)//2], absmax fp32 [blocks]) of the CPU tensor x (fp32/fp16/bf16), flattened."""
    x = x.contiguous()
    n = x.numel()
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8)
    absmax = torch.empty(-(-n // blocksize), dtype=torch.float32)
    _C.nf4_quantize_cpu(x.data_ptr(), _DTYPE_CODES[x.dtype], n, blocksize, packed.data_ptr(), absmax.data_ptr())
    return packed, absmax


def dequantize(packed: torch.Tensor, absmax: torch.Tensor, numel: int, blocksize: int,
               dtype: torch.dtype) -> torch.Tensor:
    """Flat [numel] tensor in dtype from packed codes and fp32 absmax (CPU tensors)."""
    packed, absmax = packed.contiguous(), absmax.contiguous().float()
    out = torch.empty(numel, dtype=dtype)
    _C.nf4_dequantize_cpu(packed.data_ptr(), absmax.data_ptr(), numel, blocksize, out.data_ptr(),
                          _DTYPE_CODES[dtype])
    return out
