"""Triton NF4 dequantization (bitsandbytes layout) and the decode helpers the NF4 GEMMs share.

Layout: W flattened row-major, blocks of BS elements with one absmax each, two 4-bit codes a byte with the
even element in the high nibble (see fastft/quant/nf4_format.py). A double-quantized absmax is
code2[q] * absmax2[block // NBS] + offset.

Values are code[nibble] * absmax computed in fp32 and rounded once to the output dtype, which is what
bitsandbytes computes, so the results are bit-identical to `bitsandbytes.functional.dequantize_4bit`. For that
the kernels launch with `enable_fp_fusion=False` on the GPU: the double-quantized absmax is a multiply then an
add, and a fused multiply-add would round differently.
"""
from __future__ import annotations

import torch

from fastft.kernels.autotune import Tuner
from fastft.kernels.runtime import INTERPRET, triton

import triton.language as tl

# The NF4 code values (as in fastft.quant.nf4_format, which owns the format; kernels may not import it).
_C0, _C1, _C2, _C3 = -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453
_C4, _C5, _C6, _C7 = -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0
_C8, _C9, _C10, _C11 = 0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224
_C12, _C13, _C14, _C15 = 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0

DECODE_GATHER = 0  # code[nibble] read from a 16-entry table in global memory (L1-resident)
DECODE_SELECT = 1  # code[nibble] picked by a 4-level select tree on the nibble's bits (ALU only)


@triton.jit
def nf4_code_values(nib, code_ptr, DECODE: tl.constexpr):
    """fp32 NF4 value of each 4-bit code in `nib` (int32)."""
    if DECODE == 0:
        return tl.load(code_ptr + nib)
    b0 = (nib & 1) != 0
    b1 = (nib & 2) != 0
    b2 = (nib & 4) != 0
    b3 = (nib & 8) != 0
    v0 = tl.where(b0, _C1, _C0)
    v1 = tl.where(b0, _C3, _C2)
    v2 = tl.where(b0, _C5, _C4)
    v3 = tl.where(b0, _C7, _C6)
    v4 = tl.where(b0, _C9, _C8)
    v5 = tl.where(b0, _C11, _C10)
    v6 = tl.where(b0, _C13, _C12)
    v7 = tl.where(b0, _C15, _C14)
    w0 = tl.where(b1, v1, v0)
    w1 = tl.where(b1, v3, v2)
    w2 = tl.where(b1, v5, v4)
    w3 = tl.where(b1, v7, v6)
    u0 = tl.where(b2, w1, w0)
    u1 = tl.where(b2, w3, w2)
    return tl.where(b3, u1, u0)


@triton.jit
def nf4_block_scale(absmax_ptr, absmax2_ptr, code2_ptr, offset, block, mask, NBS: tl.constexpr,
                    NESTED: tl.constexpr):
    """fp32 absmax of each block index in `block` (decoding the 8-bit nested codes when NESTED)."""
    if NESTED:
        q = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)
        return tl.load(code2_ptr + q) * tl.load(absmax2_ptr + block // NBS, mask=mask, other=0.0) + offset
    return tl.load(absmax_ptr + block, mask=mask, other=0.0)


@triton.jit
def nf4_unpack_pairs(byte):
    """[R, C] packed bytes → [R, 2C] int32 codes, the high nibble first (the even element)."""
    R: tl.constexpr = byte.shape[0]
    C: tl.constexpr = byte.shape[1]
    hi = (byte >> 4).to(tl.int32)
    lo = (byte & 0xF).to(tl.int32)
    return tl.join(hi, lo).reshape(R, 2 * C)


@triton.jit
def round_to(values, dtype: tl.constexpr, BF16_BY_HAND: tl.constexpr):
    """fp32 → dtype, round to nearest even. The interpreter truncates fp32 → bf16, so there the rounding is
    done on the bits (BF16_BY_HAND, set only under the interpreter)."""
    if BF16_BY_HAND:
        bits = values.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        return bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return values.to(dtype)


def bf16_by_hand(dtype: torch.dtype) -> bool:
    return INTERPRET and dtype == torch.bfloat16


@triton.jit
def _nf4_dequant_kernel(
    packed_ptr, absmax_ptr, absmax2_ptr, code2_ptr, code_ptr, out_ptr,
    numel, offset,
    BS: tl.constexpr, NBS: tl.constexpr, NESTED: tl.constexpr, DECODE: tl.constexpr, BF16_BY_HAND: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """out[e] = code[nibble(e)] * absmax[e // BS] for the BLOCK elements of this program (BLOCK even)."""
    pid = tl.program_id(0).to(tl.int64)
    first = pid * BLOCK
    bytes_at = first // 2 + tl.arange(0, BLOCK // 2)
    byte = tl.load(packed_ptr + bytes_at, mask=bytes_at < (numel + 1) // 2, other=0)
    nib = nf4_unpack_pairs(byte.reshape(1, BLOCK // 2)).reshape(BLOCK)
    values = nf4_code_values(nib, code_ptr, DECODE)
    elems = first + tl.arange(0, BLOCK)
    if BS >= BLOCK:  # BLOCK divides BS: one scale for the whole program
        scale = nf4_block_scale(absmax_ptr, absmax2_ptr, code2_ptr, offset, first // BS, True, NBS, NESTED)
        values = values * scale
    else:
        G: tl.constexpr = BLOCK // BS
        blocks = first // BS + tl.arange(0, G)
        scale = nf4_block_scale(absmax_ptr, absmax2_ptr, code2_ptr, offset, blocks, blocks * BS < numel,
                                NBS, NESTED)
        values = (values.reshape(G, BS) * scale[:, None]).reshape(BLOCK)
    tl.store(out_ptr + elems, round_to(values, out_ptr.dtype.element_ty, BF16_BY_HAND), mask=elems < numel)


def _configs() -> list[dict]:
    if INTERPRET:
        return [dict(BLOCK=256, DECODE=DECODE_GATHER, num_warps=4), dict(BLOCK=256, DECODE=DECODE_SELECT, num_warps=4)]
    return [dict(BLOCK=b, DECODE=d, num_warps=w)
            for b, w in ((4096, 8), (8192, 8)) for d in (DECODE_SELECT, DECODE_GATHER)]


_TUNER = Tuner("nf4_dequantize", _configs())


def launch_options() -> dict:
    """Extra launch options: no multiply-add fusion on the GPU (the nested absmax must round like bitsandbytes)."""
    return {} if INTERPRET else {"enable_fp_fusion": False}


def nf4_dequantize(packed, absmax, numel: int, blocksize: int, out_dtype: torch.dtype, code: torch.Tensor, *,
                   absmax2=None, code2=None, offset: float = 0.0, nested_blocksize: int = 256,
                   config: dict | None = None) -> torch.Tensor:
    """Flat [numel] tensor in out_dtype from NF4 data (validated by the caller, all on one device).

    absmax: fp32 [blocks], or uint8 codes with absmax2/code2/offset given (double quantization).
    config: force one launch config (tests); otherwise the tuner picks per size.
    """
    out = torch.empty(numel, dtype=out_dtype, device=packed.device)
    if numel == 0:
        return out
    nested = absmax2 is not None

    def launch(cfg):
        cfg = dict(cfg)
        grid = (triton.cdiv(numel, cfg["BLOCK"]),)
        _nf4_dequant_kernel[grid](
            packed, absmax, absmax2 if nested else absmax, code2 if nested else code, code, out,
            numel, float(offset),
            BS=blocksize, NBS=nested_blocksize, NESTED=nested, BF16_BY_HAND=bf16_by_hand(out_dtype),
            **cfg, **launch_options(),
        )

    if config is not None:
        launch(config)
    else:
        key = (triton.cdiv(numel, 1 << 20), blocksize, nested, out_dtype)
        _TUNER.run(key, launch)
    return out
