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

import struct

import torch

from fastft.kernels.autotune import Tuner
from fastft.kernels.nf4_codes import NF4_CODE_VALUES
from fastft.kernels.launch import jit
from fastft.kernels.runtime import cdiv, INTERPRET, on_operand_device, triton

import triton.language as tl

# Globals a @triton.jit function reads must be constexpr (triton >= 3.2 refuses plain Python floats).
_C0, _C1, _C2, _C3, _C4, _C5, _C6, _C7, _C8, _C9, _C10, _C11, _C12, _C13, _C14, _C15 = (
    tl.constexpr(v) for v in NF4_CODE_VALUES)

DECODE_GATHER = 0  # code[nibble] read from a 16-entry table in global memory (L1-resident)
DECODE_SELECT = 1  # code[nibble] picked by a 4-level select tree on the nibble's bits (ALU only)
DECODE_PRMT = 2    # bf16 code[nibble] by byte-permute lookups in PTX (GPU only): ~4 instructions an element


def _bf16_bits(v: float) -> int:
    b = struct.unpack("<I", struct.pack("<f", v))[0]
    return ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) & 0xFFFF


def _prmt_lookup_asm() -> str:
    """PTX turning 4 packed bytes (8 codes) into 8 bf16 NF4 values: $0,$1 the high nibbles' values of bytes
    0..3, $2,$3 the low nibbles', two bf16 a register, byte 0's first; $4 the input.

    The 16 bf16 values are kept as two byte planes (low bytes, high bytes) of four registers each. `prmt`
    picks 4 bytes out of 8 by 3-bit indices, so one plane lookup is two prmts (entries 0–7 and 8–15) and a
    third choosing per byte by bit 3 of the code; two more interleave the planes into bf16 pairs.
    """
    bits = [_bf16_bits(v) for v in NF4_CODE_VALUES]
    plane = lambda shift, i: sum(((bits[4 * i + j] >> shift) & 0xFF) << (8 * j) for j in range(4))  # noqa: E731
    lo = [plane(0, i) for i in range(4)]
    hi = [plane(8, i) for i in range(4)]
    tables = "".join(f"mov.b32 L{i}, {lo[i]:#010x}; mov.b32 H{i}, {hi[i]:#010x}; " for i in range(4))

    def lookup(sel: str, out0: str, out1: str) -> str:
        return (f"and.b32 s7, {sel}, 0x7777; shr.b32 m, {sel}, 1; and.b32 m, m, 0x4444; or.b32 m, m, 0x3210; "
                "prmt.b32 a, L0, L1, s7; prmt.b32 b, L2, L3, s7; prmt.b32 lo4, a, b, m; "
                "prmt.b32 a, H0, H1, s7; prmt.b32 b, H2, H3, s7; prmt.b32 hi4, a, b, m; "
                f"prmt.b32 {out0}, lo4, hi4, 0x5140; prmt.b32 {out1}, lo4, hi4, 0x7362; ")

    return ("{ .reg .b32 L0, L1, L2, L3, H0, H1, H2, H3, t, u, v, s7, m, a, b, lo4, hi4; " + tables +
            # nibble indices one per byte, then squeezed to prmt's 4-bit selector format (bytes 0 and 2 of y | y>>4)
            "shr.b32 t, $4, 4; and.b32 t, t, 0x0F0F0F0F; and.b32 u, $4, 0x0F0F0F0F; "
            "shr.b32 v, t, 4; or.b32 t, t, v; prmt.b32 t, t, 0, 0x4420; "
            "shr.b32 v, u, 4; or.b32 u, u, v; prmt.b32 u, u, 0, 0x4420; "
            + lookup("t", "$0", "$1") + lookup("u", "$2", "$3") + "}")


_PRMT_ASM = tl.constexpr(_prmt_lookup_asm())


@triton.jit
def nf4_bf16_codes_prmt(byte):
    """[R, C] packed bytes → [R, 2C] bf16 NF4 values (the high nibble first), by PTX byte permutes."""
    R: tl.constexpr = byte.shape[0]
    C: tl.constexpr = byte.shape[1]
    hi, lo = tl.inline_asm_elementwise(_PRMT_ASM, "=r,=r,=r,=r,r", [byte], dtype=(tl.bfloat16, tl.bfloat16),
                                       is_pure=True, pack=4)
    return tl.join(hi, lo).reshape(R, 2 * C)


@triton.jit
def nf4_code_values(nib, code_ptr, DECODE: tl.constexpr):
    """fp32 NF4 value of each 4-bit code in `nib` (int32)."""
    # One return per jit function: triton type-checks every return, even under a constexpr branch not taken.
    if DECODE == 0:
        values = tl.load(code_ptr + nib)
    else:
        b0 = (nib & 1) != 0
        b1 = (nib & 2) != 0
        b2 = (nib & 4) != 0
        b3 = (nib & 8) != 0
        w0 = tl.where(b1, tl.where(b0, _C3, _C2), tl.where(b0, _C1, _C0))
        w1 = tl.where(b1, tl.where(b0, _C7, _C6), tl.where(b0, _C5, _C4))
        w2 = tl.where(b1, tl.where(b0, _C11, _C10), tl.where(b0, _C9, _C8))
        w3 = tl.where(b1, tl.where(b0, _C15, _C14), tl.where(b0, _C13, _C12))
        values = tl.where(b3, tl.where(b2, w3, w2), tl.where(b2, w1, w0))
    return values


@triton.jit
def nf4_block_scale(absmax_ptr, absmax2_ptr, code2_ptr, offset, block, mask, NBS: tl.constexpr,
                    NESTED: tl.constexpr):
    """fp32 absmax of each block index in `block` (decoding the 8-bit nested codes when NESTED)."""
    if NESTED:
        q = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)
        scale = tl.load(code2_ptr + q) * tl.load(absmax2_ptr + block // NBS, mask=mask, other=0.0) + offset
    else:
        scale = tl.load(absmax_ptr + block, mask=mask, other=0.0)
    return scale


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
        out = bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        out = values.to(dtype)
    return out


def bf16_by_hand(dtype: torch.dtype) -> bool:
    return INTERPRET and dtype == torch.bfloat16


@triton.jit
def _program_scales(absmax_ptr, absmax2_ptr, code2_ptr, offset, first, numel, BS: tl.constexpr, NBS: tl.constexpr,
                    NESTED: tl.constexpr, BLOCK: tl.constexpr):
    """The absmax of the program's BLOCK elements from `first`: one (BLOCK divides BS) or BLOCK // BS of them."""
    if BS >= BLOCK:
        scale = nf4_block_scale(absmax_ptr, absmax2_ptr, code2_ptr, offset, first // BS, True, NBS, NESTED)
    else:
        blocks = first // BS + tl.arange(0, BLOCK // BS)
        scale = nf4_block_scale(absmax_ptr, absmax2_ptr, code2_ptr, offset, blocks, blocks * BS < numel,
                                NBS, NESTED)
    return scale


@jit
def _nf4_dequant_kernel(
    packed_ptr, absmax_ptr, absmax2_ptr, code2_ptr, code_ptr, out_ptr,
    numel, nbytes, offset,
    BS: tl.constexpr, NBS: tl.constexpr, NESTED: tl.constexpr, DECODE: tl.constexpr, BF16_BY_HAND: tl.constexpr,
    BLOCK: tl.constexpr, ROW4: tl.constexpr,
):
    """out[e] = code[nibble(e)] * absmax[e // BS] for the BLOCK elements of this program (BLOCK even; a multiple
    of 8 with ROW4)."""
    pid = tl.program_id(0).to(tl.int64)
    first = pid * BLOCK
    # nbytes is its own argument so triton sees its divisibility and vectorizes the masked byte load
    if ROW4:
        # the scales first, so their loads need not wait behind the packed bytes' (a second DRAM round trip); the
        # bytes as [BLOCK // 8, 4]: a thread's 4 bytes decode to its own 16-byte store of 8 bf16, so the decoded
        # values cross no shared-memory layout conversion (8 KB and 7 barriers a program otherwise)
        scale = _program_scales(absmax_ptr, absmax2_ptr, code2_ptr, offset, first, numel, BS, NBS, NESTED, BLOCK)
        bytes_at = first // 2 + tl.arange(0, BLOCK // 8)[:, None] * 4 + tl.arange(0, 4)[None, :]
        byte = tl.load(packed_ptr + bytes_at, mask=bytes_at < nbytes, other=0)
        nib = nf4_unpack_pairs(byte).reshape(BLOCK)
    else:
        bytes_at = first // 2 + tl.arange(0, BLOCK // 2)
        byte = tl.load(packed_ptr + bytes_at, mask=bytes_at < nbytes, other=0)
        nib = nf4_unpack_pairs(byte.reshape(1, BLOCK // 2)).reshape(BLOCK)
    values = nf4_code_values(nib, code_ptr, DECODE)
    elems = first + tl.arange(0, BLOCK)
    if not ROW4:
        scale = _program_scales(absmax_ptr, absmax2_ptr, code2_ptr, offset, first, numel, BS, NBS, NESTED, BLOCK)
    if BS >= BLOCK:  # BLOCK divides BS: one scale for the whole program
        values = values * scale
    else:
        values = (values.reshape(BLOCK // BS, BS) * scale[:, None]).reshape(BLOCK)
    tl.store(out_ptr + elems, round_to(values, out_ptr.dtype.element_ty, BF16_BY_HAND), mask=elems < numel)


def _configs() -> list[dict]:
    """The tuner's list, the first the untimed default (FASTFT_AUTOTUNE=0). ROW4 (the store's own byte layout) with
    the gather decode, promoted on the H100 run of 2026-12-05 (docs/gpu-results.md): 87% of the copy bandwidth at
    4096x14336 and 14336x4096 and 70% at 4096x4096 as CUDA-graph replays, against 77-78% and 63% for the best
    non-ROW4 config; the non-ROW4 gather configs stay as alternatives (the tuner times them all)."""
    if INTERPRET:
        return [dict(BLOCK=256, DECODE=DECODE_GATHER, num_warps=4, ROW4=True),
                dict(BLOCK=256, DECODE=DECODE_GATHER, num_warps=4, ROW4=False),
                dict(BLOCK=256, DECODE=DECODE_SELECT, num_warps=4, ROW4=False)]
    row4 = [dict(BLOCK=b, DECODE=DECODE_GATHER, num_warps=w, ROW4=True) for b, w in ((4096, 8), (8192, 8), (16384, 16))]
    return row4 + [dict(BLOCK=b, DECODE=DECODE_GATHER, num_warps=8, ROW4=False) for b in (4096, 8192)]


def candidate_configs() -> list[dict]:
    """Configs waiting for a GPU (DEVELOPERS.md): forced by tests/test_nf4_gpu.py and timed by benchmarks/gpu_nf4.py,
    in no tuner list until a run has passed the test and shown a gain. The select decode lost to gather in every
    layout on the H100 (2026-12-05: 48-59% of copy against 70-87%) and waits as a candidate only."""
    if INTERPRET:
        return [dict(BLOCK=64, DECODE=DECODE_SELECT, num_warps=4, ROW4=True),
                dict(BLOCK=256, DECODE=DECODE_SELECT, num_warps=4, ROW4=False)]
    return [dict(BLOCK=4096, DECODE=DECODE_SELECT, num_warps=8, ROW4=True),
            dict(BLOCK=4096, DECODE=DECODE_SELECT, num_warps=8, ROW4=False)]


def beside_gemm_configs() -> list[dict]:
    """The configs of a decode that runs beside a GEMM on another stream (fastft.ops.qlora_prefetch): the ROW4 ones,
    which use no shared memory; the others' 8–16 KB do not fit beside the GEMM's 225–229 KB configs on an sm_90 SM
    (tests/sm90_compile.py `overlap`)."""
    return [c for c in _configs() if c.get("ROW4")]


_TUNER = Tuner("nf4_dequantize", _configs())
_BESIDE_GEMM_TUNER = Tuner("nf4_dequantize_beside_gemm", beside_gemm_configs())


def launch_options() -> dict:
    """Extra launch options: no multiply-add fusion on the GPU (the nested absmax must round like bitsandbytes)."""
    return {} if INTERPRET else {"enable_fp_fusion": False}


@on_operand_device
def nf4_dequantize(packed, absmax, numel: int, blocksize: int, out_dtype: torch.dtype, code: torch.Tensor, *,
                   absmax2=None, code2=None, offset: float = 0.0, nested_blocksize: int = 256,
                   config: dict | None = None, out: torch.Tensor | None = None,
                   beside_gemm: bool = False) -> torch.Tensor:
    """Flat [numel] tensor in out_dtype from NF4 data (validated by the caller, all on one device).

    absmax: fp32 [blocks], or uint8 codes with absmax2/code2/offset given (double quantization).
    config: force one launch config (tests); otherwise the tuner picks per size.
    out: a contiguous [numel] out_dtype tensor to write into (a reused scratch buffer), else a new one.
    beside_gemm: launched to run beside a GEMM on another stream: beside_gemm_configs only.
    """
    if out is None:
        out = torch.empty(numel, dtype=out_dtype, device=packed.device)
    elif out.shape != (numel,) or out.dtype != out_dtype or not out.is_contiguous():
        raise ValueError(f"nf4_dequantize: `out` must be a contiguous ({numel},) {out_dtype} tensor, got "
                         f"{tuple(out.shape)} {out.dtype}")
    if numel == 0:
        return out
    nested = absmax2 is not None

    def launch(cfg):
        cfg = dict(cfg)
        cfg.setdefault("ROW4", False)
        if cfg["ROW4"] and cfg["BLOCK"] % 8:
            raise ValueError(f"nf4_dequantize: a ROW4 config needs BLOCK % 8 == 0, got {cfg}")
        grid = (cdiv(numel, cfg["BLOCK"]),)
        _nf4_dequant_kernel[grid](
            packed, absmax, absmax2 if nested else absmax, code2 if nested else code, code, out,
            numel, (numel + 1) // 2, float(offset),
            BS=blocksize, NBS=nested_blocksize, NESTED=nested, BF16_BY_HAND=bf16_by_hand(out_dtype),
            **cfg, **launch_options(),
        )

    if config is not None:
        launch(config)
    else:
        key = (cdiv(numel, 1 << 20), blocksize, nested, out_dtype)
        (_BESIDE_GEMM_TUNER if beside_gemm else _TUNER).run(key, launch)
    return out
