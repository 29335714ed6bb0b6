"""Host NF4 quantize / dequantize from the optional compiled extension (csrc/nf4_cpu.cpp, OpenMP).

Bit-identical to the torch reference in fastft/quant/nf4_format.py, faster and without float temporaries,
which matters when a checkpoint is quantized layer by layer while it loads. `available()` is False when
fastft._C was not built; callers then use the torch reference.
"""
from __future__ import annotations

import torch

try:
    from fastft import _C
    import_error = None
except ImportError as e:  # the extension is optional; why it did not load (a missing library) is kept here
    _C = None
    # (Python's own words for a missing file blame "a circular import")
    import_error = ImportError(f"fastft._C did not load: not built, or a library it needs is missing ({e}); "
                               "`bash scripts/setup.sh` builds it")

_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def available() -> bool:
    return _C is not None and hasattr(_C, "nf4_quantize_cpu")


def _check(ok: bool, message) -> None:
    if not ok:
        raise ValueError(f"fastft.kernels.nf4_cpu: {message()}")


def _check_blocksize(blocksize: int) -> None:
    # the C++ loops take a block to start on a byte and trust every size: checked here, before raw pointers
    # (at most 2^31: the C++ rounds n up to whole blocks in 64 bits, which a blocksize near 2^63 overflowed)
    _check(isinstance(blocksize, int) and 0 < blocksize <= 2**31 and blocksize % 2 == 0,
           lambda: f"`blocksize` must be a positive even int up to 2^31, got {blocksize!r}")


def quantize(x: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed uint8 [(n+1)//2], absmax fp32 [blocks]) of the CPU tensor x (fp32/fp16/bf16), flattened. x must be
    finite (quantize_nf4 checks it first): the C++ absmax skips a NaN (std::max keeps its first operand), where the
    torch reference's becomes NaN."""
    _check(x.device.type == "cpu" and x.dtype in _DTYPE_CODES,
           lambda: f"`x` must be a CPU fp32/fp16/bf16 tensor, got {x.dtype} on {x.device}")
    _check_blocksize(blocksize)
    x = x.contiguous()
    n = x.numel()
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8)
    absmax = torch.empty(-(-n // blocksize), dtype=torch.float32)
    _C.nf4_quantize_cpu(x.data_ptr(), _DTYPE_CODES[x.dtype], n, blocksize, packed.data_ptr(), absmax.data_ptr())
    return packed, absmax


def dequantize(packed: torch.Tensor, absmax: torch.Tensor, numel: int, blocksize: int,
               dtype: torch.dtype) -> torch.Tensor:
    """Flat [numel] tensor in dtype from packed codes and fp32 absmax (CPU tensors)."""
    _check_blocksize(blocksize)
    _check(isinstance(numel, int) and numel >= 0, lambda: f"`numel` must be an int >= 0, got {numel!r}")
    _check(packed.device.type == "cpu" and absmax.device.type == "cpu" and packed.dtype == torch.uint8
           and dtype in _DTYPE_CODES,
           lambda: f"expected CPU tensors, uint8 `packed` and an fp32/fp16/bf16 `dtype`; got packed {packed.dtype} "
                   f"on {packed.device}, absmax on {absmax.device}, dtype {dtype}")
    _check(packed.numel() >= (numel + 1) // 2 and absmax.numel() >= -(-numel // blocksize),
           lambda: f"{numel} values in blocks of {blocksize} need {(numel + 1) // 2} packed bytes and "
                   f"{-(-numel // blocksize)} absmax values; got {packed.numel()} and {absmax.numel()}")
    packed, absmax = packed.contiguous(), absmax.contiguous().float()
    out = torch.empty(numel, dtype=dtype)
    _C.nf4_dequantize_cpu(packed.data_ptr(), absmax.data_ptr(), numel, blocksize, out.data_ptr(),
                          _DTYPE_CODES[dtype])
    return out
