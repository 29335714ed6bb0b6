"""Triton GEMM over an NF4 weight with an optional rank-R tail:  c = a·Wᵀ (+ l·tᵀ) (+ bias),  W dequantized in tiles.

The QLoRA linear y = x·Wᵀ + b + s·(dropout(x)·Aᵀ)·Bᵀ with W (N×K) stored as NF4 (bitsandbytes layout). It is
`_lora_gemm_kernel` of fastft/kernels/lora_gemm.py (persistent grid, grouped tile order, rank-R tail after
the K loop; a dropout-masked tail goes before it, see the kernel) with one change: each W tile is loaded as packed bytes (0.5 byte an element) and dequantized in
registers, where it feeds the tensor-core dot directly, so no bf16 copy of W is ever written to memory. The skinny rank-R passes (x·Aᵀ, dy·B, dA, dB) are
fastft/kernels/rank_ops.py's `rank_project` and `rank_reduce`, unchanged.

forward   xs = c·(keep∘x)·Aᵀ          rank_project (c and B_p = b·B: s split as in fastft/kernels/rank_ops.py)
          y  = x·Wᵀ + xs·B_pᵀ + b     this kernel, W tiles [BLOCK_N rows of W, BLOCK_K columns], transposed
backward  g  = c·dy·B                 rank_project (B itself; b goes to the tail b·A and the dA, dB sums)
          dx = dy·W + keep∘(g·A)      this kernel, W tiles [BLOCK_K rows of W, BLOCK_N columns]
          dA, dB                      rank_reduce; no weight gradient (W is frozen)

Requires an even in_features that the blocksize divides (every real model); the op falls back otherwise.
"""
from __future__ import annotations

import functools

import logging
from typing import NamedTuple

import torch

from fastft.kernels.autotune import capturing, tuner
from fastft.kernels.shared import (block_source, bucket, dot_precision, dropout_keep, load_block, store_block,
                                  tile_coords, upcast)
from fastft.kernels.nf4_codes import NF4_CODE_VALUES
from fastft.kernels.nf4_dequant import (
    DECODE_GATHER,
    DECODE_PRMT,
    DECODE_SELECT,
    nf4_bf16_codes_prmt,
    nf4_block_scale,
    nf4_code_values,
    nf4_unpack_pairs,
)
from fastft.kernels.launch import jit
from fastft.kernels.runtime import (
    cdiv,
    INTERPRET,
    device_sms,
    ensure_descriptor_allocator,
    has_tma,
    on_operand_device,
    tma_compatible,
    triton,
)

import triton.language as tl

log = logging.getLogger(__name__)

class NF4Operand(NamedTuple):
    """The tensors and constants of one NF4 weight W [rows, cols], as the kernels take them."""
    packed: torch.Tensor          # uint8 [(rows*cols + 1) // 2]
    absmax: torch.Tensor          # fp32 [blocks], or uint8 codes when absmax2 is not None
    absmax2: torch.Tensor | None  # nested fp32 absmax
    code2: torch.Tensor | None    # nested 256-entry table
    offset: float
    nested_blocksize: int
    code: torch.Tensor            # the 16 NF4 values, fp32
    blocksize: int
    rows: int
    cols: int


def random_nf4_operand(rows: int, cols: int, device: torch.device, gen: torch.Generator) -> NF4Operand:
    """A double-quantized NF4 weight of random bytes and block codes (blocksize 64, nested blocks of 256, offset
    0.25), for the once-per-device checks that run two kernels on the same W."""
    blocks = rows * cols // 64
    packed = torch.randint(0, 256, (rows * cols // 2,), dtype=torch.uint8, generator=gen).to(device)
    qabsmax = torch.randint(0, 256, (blocks,), dtype=torch.uint8, generator=gen).to(device)
    absmax2 = (torch.rand(-(-blocks // 256), generator=gen) + 0.5).to(device)
    code2 = torch.linspace(-1, 1, 256).to(device)
    code = torch.tensor(NF4_CODE_VALUES, dtype=torch.float32, device=device)
    return NF4Operand(packed, qabsmax, absmax2, code2, 0.25, 256, code, 64, rows, cols)


def fused_supported(w: NF4Operand) -> bool:
    """Tiles never straddle a row in the byte or block layout."""
    return w.cols % 2 == 0 and w.cols % w.blocksize == 0 and w.packed.numel() < 2**31


@triton.jit
def _nf4_w_tile(w_ptr, w_desc, absmax_ptr, absmax2_ptr, code2_ptr, code_ptr, offset, row0, col0, WN, WK,
                R: tl.constexpr, C: tl.constexpr, BS: tl.constexpr, NBS: tl.constexpr, NESTED: tl.constexpr,
                DECODE: tl.constexpr, USE_TMA: tl.constexpr):
    """fp32 tile W[row0:row0+R, col0:col0+C] of the NF4 weight W [WN, WK] (zeros outside it)."""
    rows = row0 + tl.arange(0, R)
    if USE_TMA:
        byte = w_desc.load([row0, col0 // 2])
    else:
        bcols = col0 // 2 + tl.arange(0, C // 2)
        byte = tl.load(w_ptr + rows[:, None] * (WK // 2) + bcols[None, :],
                       mask=(rows[:, None] < WN) & (bcols[None, :] < WK // 2), other=0)
    if DECODE == 2:
        vals = nf4_bf16_codes_prmt(byte).to(tl.float32)
    else:
        vals = nf4_code_values(nf4_unpack_pairs(byte), code_ptr, DECODE)
    blocks_per_row = WK // BS
    if C <= BS:  # the tile's columns lie in one block: one scale per row
        blk = rows * blocks_per_row + col0 // BS
        scale = nf4_block_scale(absmax_ptr, absmax2_ptr, code2_ptr, offset, blk, (rows < WN) & (col0 < WK),
                                NBS, NESTED)
        tile = vals * scale[:, None]
    else:
        G: tl.constexpr = C // BS
        groups = col0 // BS + tl.arange(0, G)
        blk = rows[:, None] * blocks_per_row + groups[None, :]
        scale = nf4_block_scale(absmax_ptr, absmax2_ptr, code2_ptr, offset, blk,
                                (rows[:, None] < WN) & (groups[None, :] < blocks_per_row), NBS, NESTED)
        tile = (vals.reshape(R, G, BS) * scale[:, :, None]).reshape(R, C)
    return tile


@triton.jit
def _tail_operands(t_ptr, l_ptr, rows, cols, offs_r, M, N, stride_tn, stride_tr, stride_lm, UPCAST: tl.constexpr):
    """The rank-R factors of this tile: t [BLOCK_N, R] and l [BLOCK_M, R]."""
    tr = tl.load(t_ptr + cols[:, None] * stride_tn + offs_r[None, :] * stride_tr, mask=cols[:, None] < N, other=0.0)
    lo = tl.load(l_ptr + rows[:, None] * stride_lm + offs_r[None, :], mask=rows[:, None] < M, other=0.0)
    if UPCAST:
        tr = tr.to(tl.float32)
        lo = lo.to(tl.float32)
    return tr, lo


@jit
def _nf4_lora_gemm_kernel(
    a_ptr, w_ptr, absmax_ptr, absmax2_ptr, code2_ptr, code_ptr, l_ptr, t_ptr, bias_ptr, c_ptr,
    M, N, K, WN, WK,
    stride_am, stride_ak, stride_lm, stride_tn, stride_tr, stride_cm,
    offset, p_drop, seed,
    BS: tl.constexpr, NBS: tl.constexpr, NESTED: tl.constexpr, DECODE: tl.constexpr,
    HAS_TAIL: tl.constexpr, HAS_BIAS: tl.constexpr, TAIL_DROPOUT: tl.constexpr, W_NK: tl.constexpr,
    USE_TMA: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr, NUM_SMS: tl.constexpr,
):
    """c[M,N] = a[M,K]·bᵀ (+ l[M,R]·tᵀ) (+ bias) with b = W [WN, WK] in NF4.

    W_NK: b is W itself (the forward: N = WN, K = WK); else b = Wᵀ (dx: N = WK, K = WN). t is logically
    [N, R] at (stride_tn, stride_tr). TAIL_DROPOUT masks the tail by dropout_keep(row, col) of c.

    The tile is computed transposed, cᵀ[BLOCK_N, BLOCK_M] = b_tile · a_tileᵀ, so the dequantized W tile is
    the MMA's register operand: it never goes through shared memory, and the next tile's decode overlaps the
    running asynchronous MMA (with W as the shared-memory operand triton waits for each MMA to finish).
    """
    start_pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_tiles = num_pid_m * num_pid_n
    k_tiles = tl.cdiv(K, BLOCK_K)
    dtype = c_ptr.dtype.element_ty
    # W tile shape in storage order: [BLOCK_N, BLOCK_K] in the forward, [BLOCK_K, BLOCK_N] for dx.
    WR: tl.constexpr = BLOCK_N if W_NK else BLOCK_K
    WC: tl.constexpr = BLOCK_K if W_NK else BLOCK_N

    a_src = block_source(a_ptr, M, K, stride_am, BLOCK_M, BLOCK_K, USE_TMA)
    c_dst = block_source(c_ptr, M, N, stride_cm, BLOCK_M, BLOCK_N, USE_TMA)
    w_desc = None
    if USE_TMA:
        w_desc = tl.make_tensor_descriptor(w_ptr, shape=[WN, WK // 2], strides=[WK // 2, 1],
                                           block_shape=[WR, WC // 2])

    offs_r = tl.arange(0, BLOCK_R)
    for tile_id in tl.range(start_pid, num_tiles, NUM_SMS):
        pid_m, pid_n = tile_coords(tile_id, num_pid_m, num_pid_n, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        rows = off_m + tl.arange(0, BLOCK_M)
        cols = off_n + tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)  # cᵀ
        if HAS_TAIL and TAIL_DROPOUT:
            # The masked tail needs its own product; taken before the K loop it becomes the accumulator's
            # starting value, so two BLOCK_N×BLOCK_M fp32 tiles are never live at once (they spill at 256×128).
            tr, lo = _tail_operands(t_ptr, l_ptr, rows, cols, offs_r, M, N, stride_tn, stride_tr, stride_lm, UPCAST)
            tail = tl.dot(tr, lo.T, input_precision=DOT_PRECISION)
            acc = tl.where(dropout_keep(seed, rows, cols, N, p_drop).T, tail, 0.0)
        for ki in range(k_tiles):
            off_k = ki * BLOCK_K
            a = load_block(a_src, off_m, off_k, M, K, stride_am, stride_ak, BLOCK_M, BLOCK_K, USE_TMA)
            if W_NK:
                w = _nf4_w_tile(w_ptr, w_desc, absmax_ptr, absmax2_ptr, code2_ptr, code_ptr, offset, off_n, off_k,
                                WN, WK, WR, WC, BS, NBS, NESTED, DECODE, USE_TMA)
            else:
                w = _nf4_w_tile(w_ptr, w_desc, absmax_ptr, absmax2_ptr, code2_ptr, code_ptr, offset, off_k, off_n,
                                WN, WK, WR, WC, BS, NBS, NESTED, DECODE, USE_TMA).T
            if UPCAST:
                a = a.to(tl.float32)
            else:
                w = w.to(dtype)
            acc = tl.dot(w, a.T, acc, input_precision=DOT_PRECISION)

        if HAS_TAIL and not TAIL_DROPOUT:  # the LoRA term: R more reduction steps over the rank-R factors
            tr, lo = _tail_operands(t_ptr, l_ptr, rows, cols, offs_r, M, N, stride_tn, stride_tr, stride_lm, UPCAST)
            acc = tl.dot(tr, lo.T, acc, input_precision=DOT_PRECISION)
        if HAS_BIAS:
            bias = tl.load(bias_ptr + cols, mask=cols < N, other=0.0)
            acc += bias.to(tl.float32)[:, None]

        store_block(c_dst, off_m, off_n, M, N, stride_cm, acc.T.to(dtype), BLOCK_M, BLOCK_N, USE_TMA)


# ----------------------------------------------------------------------------------------------
# Launch configs. Few on purpose: each one is a compile. Decoding costs ALU work per W element while the
# tensor-core work per W element grows with BLOCK_M, so tall tiles (BLOCK_M = 256) hide the decode best.
# Per k-step of a 256×128×64 tile (sm_90 SASS): ~420 instructions a thread with the byte-permute decode,
# ~780 with the select tree; the table gather pipelines its loads through shared memory instead.

@functools.lru_cache(maxsize=None)
def _usable_configs(elem_bytes: int, prmt_ok: bool, dropout: bool = False) -> list[dict]:
    """gemm_configs without the PRMT decode where its self-check failed (the same list object per arguments)."""
    configs = gemm_configs(elem_bytes, dropout)
    return configs if prmt_ok else [c for c in configs if c["DECODE"] != DECODE_PRMT]


@functools.lru_cache(maxsize=None)
def gemm_configs(elem_bytes: int, dropout: bool = False) -> list[dict]:
    """Launch configs; dropout: of dx with a dropout-masked tail, which keeps a second fp32 tile live (the 256-row
    tiles spill ~2.6 KB under triton 3.6 there, the gather decode 128–280 B): 128×128 with the register decodes."""
    if INTERPRET:
        return [dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=2, DECODE=DECODE_SELECT, num_warps=4,
                     num_stages=1)]
    if elem_bytes == 4:
        return [dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, DECODE=DECODE_SELECT, num_warps=4,
                     num_stages=3)]
    shapes = ([(128, 128, 64, 8, 4, DECODE_PRMT), (128, 128, 64, 8, 3, DECODE_PRMT),
               (128, 128, 64, 8, 3, DECODE_SELECT)] if dropout else
              [(256, 128, 64, 8, 3, DECODE_PRMT), (128, 128, 64, 8, 4, DECODE_PRMT),
               (256, 128, 64, 8, 3, DECODE_SELECT), (128, 128, 64, 8, 3, DECODE_GATHER)])
    return [dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, DECODE=d, num_warps=w, num_stages=s)
            for bm, bn, bk, w, s, d in shapes]


def _prmt_checked(device: torch.device, dtype: torch.dtype) -> bool:
    """Once per device and dtype: the byte-permute decode (inline PTX) agrees with the select tree.

    A safety net for the one decode the CPU interpreter cannot run: if a triton version lowered its inline
    assembly differently, the tuner must not pick a fast wrong kernel. On a mismatch the PRMT configs are dropped.
    """
    key = (device, dtype)
    if key not in _PRMT_OK and capturing():  # its read-back is refused while a CUDA graph is captured: without the
        return False  # PRMT configs this time, unremembered (torch.compile's graph trees warm up before capturing)
    if key not in _PRMT_OK:
        # The check's problem specializes like a real QLoRA forward (double-quantized W, blocksize 64, a rank
        # tail, sizes divisible by 16), so its two compiled kernels are the ones the tuner times anyway.
        gen = torch.Generator(device="cpu").manual_seed(0)
        K = N = 256
        w = random_nf4_operand(N, K, device, gen)
        a = (torch.randn(256, K, generator=gen) / 16).to(device=device, dtype=dtype)
        lo = torch.zeros(256, 16, device=device, dtype=dtype)
        t = torch.zeros(N, 16, device=device, dtype=dtype)
        base = dict(BLOCK_M=256, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3)
        try:
            fast = nf4_lora_gemm(a, w, lo, t, None, w_nk=True, config=dict(base, DECODE=DECODE_PRMT)).float()
            ref = nf4_lora_gemm(a, w, lo, t, None, w_nk=True, config=dict(base, DECODE=DECODE_SELECT)).float()
            ok = bool(((fast - ref).norm() / ref.norm()).item() < 1e-2)
        except Exception as err:  # noqa: BLE001 - no PTX path on this GPU/triton: the tuner goes without it
            log.info("nf4 byte-permute decode unavailable: %s", err)
            ok = False
        if not ok:
            log.warning("nf4_lora_gemm: the byte-permute decode disagrees with the reference here; not using it")
        _PRMT_OK[key] = ok
    return _PRMT_OK[key]


_PRMT_OK: dict[tuple, bool] = {}
@on_operand_device
def nf4_lora_gemm(a, w: NF4Operand, lo, t, bias, *, w_nk: bool, p_drop: float = 0.0, seed: int = 0,
                  config: dict | None = None) -> torch.Tensor:
    """c = a·bᵀ (+ lo·tᵀ) (+ bias) with b = W (w_nk, the forward) or Wᵀ (dx); operands validated by the caller.

    a [M, K] in fp16/bf16/fp32; lo [M, R] contiguous and t logical [N, R] (B [N, R] in the forward, A [R, N]
    for dx), or both None for no LoRA tail; the tail is masked by dropout when p_drop > 0.
    config: force one launch config (tests); otherwise the tuner picks per problem.
    """
    M, K = a.shape
    N = w.rows if w_nk else w.cols
    has_tail = lo is not None
    R = lo.shape[1] if has_tail else 16
    c = torch.empty((M, N), device=a.device, dtype=a.dtype)
    if bias is not None and bias.stride(0) != 1:  # the kernel reads bias[n] at bias_ptr + n
        bias = bias.contiguous()
    stride_tn, stride_tr = (0, 0)
    if has_tail:
        stride_tn, stride_tr = t.stride() if w_nk else t.stride()[::-1]
    # c is a fresh contiguous allocation (aligned): only its row pitch can rule descriptors out
    use_tma = (has_tma(a.device) and tma_compatible(a) and (N * c.element_size()) % 16 == 0 and w.cols % 32 == 0
               and w.packed.data_ptr() % 16 == 0)
    if use_tma:
        ensure_descriptor_allocator()
    sms = device_sms(a.device)
    nested = w.absmax2 is not None
    upcast_tiles = upcast(a.dtype)
    precision = dot_precision(a.dtype)

    sa = a.stride()
    tail_dropout = has_tail and p_drop > 0.0  # the kernel's TAIL_DROPOUT, which also picks the config list

    def launch(cfg):
        tiles = cdiv(M, cfg["BLOCK_M"]) * cdiv(N, cfg["BLOCK_N"])
        grid = (max(1, min(sms, tiles)),)
        _nf4_lora_gemm_kernel[grid](
            a, w.packed, w.absmax, w.absmax2 if nested else w.absmax, w.code2 if nested else w.code, w.code,
            lo if has_tail else c, t if has_tail else c, bias if bias is not None else c, c,
            M, N, K, w.rows, w.cols,
            sa[0], sa[1], lo.stride(0) if has_tail else 0, stride_tn, stride_tr, N,
            float(w.offset), p_drop, seed,
            BS=w.blocksize, NBS=w.nested_blocksize, NESTED=nested,
            HAS_TAIL=has_tail, HAS_BIAS=bias is not None, TAIL_DROPOUT=tail_dropout, W_NK=w_nk,
            USE_TMA=use_tma, UPCAST=upcast_tiles, DOT_PRECISION=precision,
            BLOCK_R=R, NUM_SMS=grid[0], **cfg,
        )

    if config is not None:
        launch(config)
    else:
        key = (bucket(M), N, K, R, a.dtype, w_nk, w.blocksize, nested, has_tail, bias is not None, p_drop > 0.0, use_tma)
        configs = gemm_configs(a.element_size(), tail_dropout)
        if any(c["DECODE"] == DECODE_PRMT for c in configs):
            configs = _usable_configs(a.element_size(), _prmt_checked(a.device, a.dtype), tail_dropout)
        tuner("nf4_lora_gemm", configs).run(key, launch)
    return c
