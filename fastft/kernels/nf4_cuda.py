"""The CUDA decode GEMV over an NF4 weight (csrc/cuda/nf4_gemv.cu), from the optional compiled extension.

y[b, n] = Σ_k x[b, k]·W[n, k] (+ bias[n]) for 1 ≤ batch ≤ 16 tokens, reading W once at 0.5 byte an element.
`supported(...)` says whether this launch can take the problem; callers fall back to the Triton GEMM.
"""
from __future__ import annotations

import torch

try:
    from fastft import _C
except ImportError:  # the extension is optional
    _C = None

MAX_BATCH = 16
_DTYPE_CODES = {torch.float16: 1, torch.bfloat16: 2}


def available() -> bool:
    return _C is not None and hasattr(_C, "nf4_gemv_cuda")


def supported(x2: torch.Tensor, w) -> bool:
    """x2 [batch, K] and w a fastft.kernels.nf4_gemm.NF4Operand."""
    return (available() and x2.is_cuda and x2.dtype in _DTYPE_CODES and 1 <= x2.shape[0] <= MAX_BATCH
            and w.cols % 32 == 0 and w.blocksize >= 32 and w.packed.data_ptr() % 16 == 0)


def nf4_gemv(x2: torch.Tensor, w, bias: torch.Tensor | None) -> torch.Tensor:
    """y [batch, w.rows] in x2's dtype; the caller checked `supported(x2, w)`."""
    if x2.stride(1) != 1 or x2.stride(0) % 8 or x2.data_ptr() % 16:
        x2 = x2.contiguous()  # 16-byte vector loads need aligned rows; x is small at decode time
    if bias is not None:
        bias = bias.to(x2.dtype).contiguous()
    batch, k = x2.shape
    y = torch.empty((batch, w.rows), dtype=x2.dtype, device=x2.device)
    nested = w.absmax2 is not None
    with torch.cuda.device(x2.device):
        _C.nf4_gemv_cuda(
            x2.data_ptr(), x2.stride(0), w.packed.data_ptr(), w.absmax.data_ptr(),
            w.absmax2.data_ptr() if nested else 0, w.code2.data_ptr() if nested else 0, float(w.offset),
            w.nested_blocksize, bias.data_ptr() if bias is not None else 0, y.data_ptr(), y.stride(0), batch,
            w.rows, k, w.blocksize, _DTYPE_CODES[x2.dtype], torch.cuda.current_stream(x2.device).cuda_stream)
    return y
