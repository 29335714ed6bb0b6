"""The NF4 storage format of bitsandbytes, in plain torch: code tables, quantize, dequantize.

Layout (bit-compatible with `bitsandbytes.functional.quantize_4bit(..., quant_type="nf4")`):
- the tensor is flattened row-major and cut into blocks of `blocksize` elements (the last one may be short);
- absmax[b] = max |x| over block b (fp32); each element is scaled by 1/absmax and rounded to the nearest of
  the 16 NF4 code values (ties to the lower code);
- two 4-bit codes per byte, the element with the even flat index in the HIGH nibble; an odd numel pads
  the last low nibble with code 7 (the zero);
- double quantization: absmax is stored as 8-bit codes of the signed dynamic map (bnb's
  `create_dynamic_map()`), in blocks of 256 with their own fp32 absmax, after subtracting the mean
  `offset`: absmax ≈ code2[q] * absmax2[b // 256] + offset. The 8-bit codes are rounded the way
  bitsandbytes' host quantizer rounds them (through a 65536-bin table, `blockwise8_lut`).

These functions are the reference every faster path (C++ on the host, Triton on the GPU) is tested against,
and the path used where neither is available. They work on any device. The exact float operations
(reciprocal then multiply for full blocks, a division for the short tail block, the 1e-38 clamp) copy what
bitsandbytes does, so the bytes come out identical.
"""
from __future__ import annotations

import functools

import torch

from fastft.kernels.nf4_codes import NF4_CODE_VALUES

NF4_ZERO_CODE = 7
VALID_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
NESTED_BLOCKSIZE = 256
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_TINY = 1e-38  # bitsandbytes clamps absmax to this before taking its reciprocal
_CHUNK_ELEMS = 1 << 24  # the torch paths work in chunks so peak memory stays near one chunk


@functools.lru_cache(maxsize=None)
def nf4_code(device: str = "cpu") -> torch.Tensor:
    return torch.tensor(NF4_CODE_VALUES, dtype=torch.float32, device=device)


@functools.lru_cache(maxsize=None)
def _nf4_bounds(device: str) -> torch.Tensor:
    code = nf4_code(device)
    return (code[:-1] + code[1:]) / 2  # fp32 midpoints, computed as bitsandbytes computes them


@functools.lru_cache(maxsize=None)
def dynamic_code(device: str = "cpu") -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic map (256 sorted fp32 values in [-0.993, 1]), built the same way."""
    values: list[float] = []
    for i in range(7):  # max_exponent_bits = 7, 7 non-sign bits
        bounds = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        scale = 10 ** (-6 + i)
        values += (scale * means).tolist()
        values += (-scale * means).tolist()
    values += [0.0, 1.0]
    values.sort()
    return torch.tensor(values, dtype=torch.float32, device=device)


def check_blocksize(blocksize, who: str) -> int:
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize not in VALID_BLOCKSIZES:
        raise ValueError(f"{who}: `blocksize` must be a power of two between 32 and 4096 "
                         f"(one of {VALID_BLOCKSIZES}), got {blocksize!r}")
    return blocksize


def num_blocks(numel: int, blocksize: int) -> int:
    return -(-numel // blocksize)


# ----------------------------------------------------------------------------------------------
# 4-bit NF4

def _codes_of(scaled: torch.Tensor) -> torch.Tensor:
    return torch.bucketize(scaled, _nf4_bounds(str(scaled.device)), out_int32=True).to(torch.uint8)


def _pack_pairs(q: torch.Tensor) -> torch.Tensor:
    return (q[0::2] << 4) | q[1::2]


def quantize_nf4_torch(x: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed uint8 [(n+1)//2], absmax fp32 [ceil(n/blocksize)]) of x flattened; any device."""
    flat = x.reshape(-1)
    n = flat.numel()
    full_blocks, rem = divmod(n, blocksize)
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8, device=x.device)
    absmax = torch.empty(num_blocks(n, blocksize), dtype=torch.float32, device=x.device)
    step = max(1, _CHUNK_ELEMS // blocksize)
    for b0 in range(0, full_blocks, step):
        b1 = min(full_blocks, b0 + step)
        blocks = flat[b0 * blocksize: b1 * blocksize].float().view(-1, blocksize)
        am = blocks.abs().amax(dim=1)
        absmax[b0:b1] = am
        scaled = (blocks * (1.0 / am.clamp(min=_TINY)).view(-1, 1)).clamp_(-1, 1).view(-1)
        packed[b0 * blocksize // 2: b1 * blocksize // 2] = _pack_pairs(_codes_of(scaled))
    if rem:
        start = full_blocks * blocksize
        tail = flat[start:].float()
        am = tail.abs().max().clamp(min=_TINY)  # bitsandbytes stores the clamped value for the tail block
        absmax[-1] = am
        q = _codes_of(torch.clamp(tail / am, -1, 1))
        if rem % 2:
            q = torch.cat([q, q.new_full((1,), NF4_ZERO_CODE)])
        packed[start // 2:] = _pack_pairs(q)
    return packed, absmax


def dequantize_nf4_torch(packed: torch.Tensor, absmax: torch.Tensor, numel: int, blocksize: int,
                         dtype: torch.dtype) -> torch.Tensor:
    """Flat [numel] tensor in dtype: code[nibble] * absmax[block] in fp32, then rounded once to dtype."""
    code = nf4_code(str(packed.device))
    out = torch.empty(numel, dtype=dtype, device=packed.device)
    step = max(1, _CHUNK_ELEMS // blocksize) * blocksize  # whole blocks per chunk (blocksize is even)
    for e0 in range(0, numel, step):
        e1 = min(numel, e0 + step)
        byte = packed[e0 // 2: (e1 + 1) // 2]
        q = torch.stack([byte >> 4, byte & 0xF], dim=1).view(-1)[: e1 - e0]
        scale = absmax[e0 // blocksize: num_blocks(e1, blocksize)].repeat_interleave(blocksize)[: e1 - e0]
        out[e0:e1] = (code[q.long()] * scale).to(dtype)
    return out


# ----------------------------------------------------------------------------------------------
# 8-bit blockwise (double quantization of absmax)

_LUT_BINS = 65536


@functools.lru_cache(maxsize=None)
def blockwise8_lut(device: str = "cpu") -> torch.Tensor:
    """bitsandbytes' host quantizer rounds through a table: [-1, 1] cut into 65536 bins, each mapped to the
    code nearest the bin's value. Rebuilt here from the same float operations, so the bytes match."""
    code = dynamic_code(device)
    mid = 0.5 * (code[:-1] + code[1:])
    vals = -1.0 + (2.0 * torch.arange(_LUT_BINS, dtype=torch.float32, device=device)) / (_LUT_BINS - 1)
    return torch.searchsorted(mid, vals, right=False).to(torch.uint8)  # number of midpoints below the value


def quantize_blockwise8_torch(v: torch.Tensor, blocksize: int = NESTED_BLOCKSIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 codes of the dynamic map, fp32 absmax per block) of fp32 v, as bitsandbytes' host quantizer."""
    n = v.numel()
    nb = num_blocks(n, blocksize)
    padded = torch.zeros(nb * blocksize, dtype=torch.float32, device=v.device)
    padded[:n] = v.reshape(-1)
    blocks = padded.view(nb, blocksize)
    am = blocks.abs().amax(dim=1)  # the zero padding never raises a block's absmax
    inv = 1.0 / torch.where(am == 0, torch.ones_like(am), am)
    scaled = (blocks * inv.view(-1, 1)).clamp_(-1, 1)
    bins = ((scaled + 1.0) * 0.5) * (_LUT_BINS - 1)
    bins = (bins + 0.5).to(torch.int32).clamp_(0, _LUT_BINS - 1)  # truncation, as the C cast (NaN: refused after)
    q = blockwise8_lut(str(v.device))[bins.long()]
    q[am == 0] = 0
    q = q.view(-1)
    # its own storage, not a view into the block padding: safetensors refuses a tensor that does not cover its
    # storage (accelerate's load_state of a quantized model's state dict)
    return (q if q.numel() == n else q[:n].clone()), am


def dequantize_blockwise8_torch(q: torch.Tensor, absmax2: torch.Tensor, code: torch.Tensor, offset,
                                blocksize: int = NESTED_BLOCKSIZE) -> torch.Tensor:
    """fp32 code[q] * absmax2[block] + offset, as two separately rounded operations (no fused multiply-add)."""
    scale = absmax2.repeat_interleave(blocksize)[: q.numel()]
    out = code.to(q.device)[q.long()] * scale
    if not isinstance(offset, torch.Tensor):  # a float, or a 0-d fp32 tensor (NF4Weight.nested_offset)
        offset = torch.tensor(offset, dtype=torch.float32, device=q.device)
    return out + offset


def double_quantize(absmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """absmax fp32 → (q uint8, absmax2 fp32, code2 fp32[256], offset) as bitsandbytes' compress_statistics."""
    offset = absmax.mean()  # torch's own fp32 mean, as bitsandbytes takes it
    q, absmax2 = quantize_blockwise8_torch(absmax - offset)
    # scales near fp32's limits (|w| ~ 1e-38 or ~ 1e38) overflow the mean or 1/(a group's largest |scale - mean|):
    # the codes would be garbage (bitsandbytes returns NaN scales for the huge case)
    # groups of all-zero blocks (scale 0, or bitsandbytes' 1e-38 floor for a short tail block) decode to zero
    # whatever their codes: not checked (their 1/absmax2 overflows, yet bitsandbytes quantizes them exactly)
    zero = (absmax == 0) | (absmax == torch.tensor(_TINY, dtype=absmax.dtype))
    groups = torch.nn.functional.pad(zero, (0, (-zero.numel()) % NESTED_BLOCKSIZE), value=True)
    live = (absmax2 > 0) & ~groups.view(-1, NESTED_BLOCKSIZE).all(dim=1)
    if not bool(torch.isfinite(offset)) or not bool(torch.isfinite(1.0 / absmax2[live]).all()):
        raise ValueError(f"quantize_nf4(double_quant=True): block scales from {float(absmax.min()):.3g} to "
                         f"{float(absmax.max()):.3g} are beyond what the 8-bit nested code holds in fp32; quantize "
                         "this weight with double_quant=False (or rescale it)")
    return q, absmax2, dynamic_code(str(absmax.device)).clone(), float(offset.item())
