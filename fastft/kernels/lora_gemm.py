"""Triton GEMM of the fused LoRA linear with its rank tail:  c = a·bᵀ + lo·tᵀ (+ bias), one accumulator.

Shapes (the forward): x (M×K), W (N×K) frozen, A (r×K), B (N×r). The rank is padded to R ≥ 16 (a power of two,
fastft.kernels.rank_ops.rank_pad) with zero rows/columns, so every tail step is one full tensor-core tile.
The design follows ../shared/notes/lora-roofline.md: the LoRA terms never cost a full-size elementwise pass over
y or dx. Of the six products of y = x·Wᵀ + b + s·(dropout(x)·Aᵀ)·Bᵀ and its gradients this file holds the two big
ones; the four skinny rank-R passes (xs = c·(keep∘x)·Aᵀ, g = c·dy·B, dA, dB) are in fastft.kernels.rank_ops.

forward   y  = x·Wᵀ + xs·B_pᵀ + b            one GEMM; the LoRA term is R extra reduction steps
backward  dx = dy·W + keep∘(g·A)             one GEMM; the LoRA term again R extra steps
with s = a·b, B_p = b·B and c = a/(1-p) (fastft.kernels.rank_ops). The dropout mask `keep` is never stored: the dx
tail regenerates it from the seed and the element's (row, column) index in x with Philox
(fastft.kernels.shared.dropout_keep).

The fold variant (FOLD, `lora_gemm_folded`; chosen per shape by fastft.ops.lora_path) drops the xs and g passes:
the forward GEMM accumulates x_tile·A_tileᵀ beside x_tile·W_tileᵀ in its own K loop and writes xs from its
pid_n == 0 tiles; the dx GEMM does the same with dy_tile·B_tile and writes g. Every N tile recomputes that
BLOCK_M×R projection (R/BLOCK_N more MMA work) instead of reading x or dy again.

The same kernel, without a tail and with a column or K scale, is DoRA's and IA3's GEMM. Launchers take 2-D
operands, pick configs and grids; validation lives in fastft.ops.
"""
from __future__ import annotations

import functools
import warnings

import torch

from fastft.kernels.autotune import tuner
from fastft.kernels.launch import jit
from fastft.kernels.shared import (
    block_source,
    bucket,
    dot_precision,
    dropout_keep,
    kn_source,
    load_block,
    load_kn_block,
    store_block,
    tile_coords,
    unit_stride,
    upcast,
)
from fastft.kernels.runtime import (
    INTERPRET,
    cdiv,
    device_sms,
    ensure_descriptor_allocator,
    has_tma,
    on_operand_device,
    tma_compatible,
    wide_offsets,
)

import triton.language as tl


@jit
def _lora_gemm_kernel(
    a_ptr, b_ptr, l_ptr, t_ptr, bias_ptr, c_ptr, col_scale_ptr, k_scale_ptr, p_ptr,
    M, N, K,
    stride_am, stride_ak, stride_bn, stride_bk, stride_lm, stride_tn, stride_tr, stride_cm, stride_pk, stride_pr,
    p_drop, seed, num_programs, fold_scale,
    HAS_BIAS: tl.constexpr, TAIL_DROPOUT: tl.constexpr, B_NK: tl.constexpr,
    HAS_TAIL: tl.constexpr, HAS_COL_SCALE: tl.constexpr, HAS_K_SCALE: tl.constexpr, FOLD: tl.constexpr,
    USE_TMA: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr, FLATTEN: tl.constexpr, WIDE: tl.constexpr,
):
    """c[M,N] = (a[M,K]·diag(k_scale)·bᵀ + l[M,R]·tᵀ)·diag(col_scale) (+ bias), b logically [N,K], t [N,R].

    HAS_TAIL: the rank-R term is there (else l/t are unused). HAS_K_SCALE: each loaded a-tile is scaled along K
    (IA3's input scale; DoRA's/IA3's σ on dy for dx). HAS_COL_SCALE: the accumulator is scaled per output
    column before the bias (DoRA's m/‖W'‖, IA3's output scale). Both scales are fp32 vectors.

    B_NK: b and t are stored N-major ([N,K] / [N,R], the forward) or K-major ([K,N] / [R,N], dx).
    TAIL_DROPOUT: the tail is masked by dropout_keep(row, col) of c (dx of a dropout LoRA).
    FOLD (with HAS_TAIL): l is not read but computed in the same K loop, l = fold_scale·a·p with p logically
    [K,R] (stored like b: [R,K] when B_NK, else [K,R]), rounded to c's dtype as a stored l would be; the tiles
    with pid_n == 0 write it to l_ptr (every N tile computes the same values in the same order).
    Persistent: `num_programs` programs (about one per SM) walk the output tiles.
    WIDE: b, t and p are read with int64 pointer offsets (shared.load_kn_block; a and c always are).
    """
    start_pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_tiles = num_pid_m * num_pid_n
    k_tiles = tl.cdiv(K, BLOCK_K)
    dtype = c_ptr.dtype.element_ty

    a_src = block_source(a_ptr, M, K, stride_am, BLOCK_M, BLOCK_K, USE_TMA)
    c_dst = block_source(c_ptr, M, N, stride_cm, BLOCK_M, BLOCK_N, USE_TMA)
    b_src = kn_source(b_ptr, K, N, stride_bn, stride_bk, BLOCK_K, BLOCK_N, B_NK, USE_TMA)
    if HAS_TAIL:
        t_src = kn_source(t_ptr, BLOCK_R, N, stride_tn, stride_tr, BLOCK_R, BLOCK_N, B_NK, USE_TMA)
        if FOLD:
            p_src = kn_source(p_ptr, K, BLOCK_R, stride_pr, stride_pk, BLOCK_K, BLOCK_R, B_NK, USE_TMA)
        else:
            l_src = block_source(l_ptr, M, BLOCK_R, stride_lm, BLOCK_M, BLOCK_R, USE_TMA)

    offs_r = tl.arange(0, BLOCK_R)
    for tile_id in tl.range(start_pid, num_tiles, num_programs, flatten=FLATTEN):
        pid_m, pid_n = tile_coords(tile_id, num_pid_m, num_pid_n, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        rows = off_m + tl.arange(0, BLOCK_M)
        cols = off_n + tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if FOLD:
            acc_l = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for ki in range(k_tiles):
            off_k = ki * BLOCK_K
            a = load_block(a_src, off_m, off_k, M, K, stride_am, stride_ak, BLOCK_M, BLOCK_K, USE_TMA)
            b = load_kn_block(b_src, off_k, off_n, K, N, stride_bk, stride_bn, BLOCK_K, BLOCK_N, B_NK, USE_TMA,
                              WIDE=WIDE)
            if UPCAST:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            if HAS_K_SCALE:
                ksc = tl.load(k_scale_ptr + off_k + tl.arange(0, BLOCK_K), mask=off_k + tl.arange(0, BLOCK_K) < K,
                              other=0.0)
                a = (a.to(tl.float32) * ksc[None, :]).to(b.dtype)
            acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
            if FOLD:  # the rank-R projection of the same a tile: R more columns of MMA, no extra pass over a
                pt = load_kn_block(p_src, off_k, 0, K, BLOCK_R, stride_pk, stride_pr, BLOCK_K, BLOCK_R, B_NK, USE_TMA,
                                   CHECK_N=False, WIDE=WIDE)
                if UPCAST:
                    pt = pt.to(tl.float32)
                acc_l = tl.dot(a, pt, acc_l, input_precision=DOT_PRECISION)

        # The LoRA term: R more reduction steps over the rank-R factors.
        if HAS_TAIL:
            if FOLD:
                lo = (acc_l * fold_scale).to(dtype)
                if pid_n == 0:
                    tl.store(l_ptr + rows[:, None] * stride_lm + offs_r[None, :], lo, mask=rows[:, None] < M)
            else:
                lo = load_block(l_src, off_m, 0, M, BLOCK_R, stride_lm, 1, BLOCK_M, BLOCK_R, USE_TMA, CHECK_COLS=False)
            tr = load_kn_block(t_src, 0, off_n, BLOCK_R, N, stride_tr, stride_tn, BLOCK_R, BLOCK_N, B_NK, USE_TMA,
                               CHECK_K=False, WIDE=WIDE)
            if UPCAST:
                lo = lo.to(tl.float32)
                tr = tr.to(tl.float32)
            if TAIL_DROPOUT:
                tail = tl.dot(lo, tr, input_precision=DOT_PRECISION)
                acc += tl.where(dropout_keep(seed, rows, cols, N, p_drop), tail, 0.0)
            else:
                acc = tl.dot(lo, tr, acc, input_precision=DOT_PRECISION)
        if HAS_COL_SCALE:
            acc = acc * tl.load(col_scale_ptr + cols, mask=cols < N, other=0.0)[None, :]
        if HAS_BIAS:
            bias = tl.load(bias_ptr + cols, mask=cols < N, other=0.0)
            acc += bias.to(tl.float32)[None, :]

        store_block(c_dst, off_m, off_n, M, N, stride_cm, acc.to(dtype), BLOCK_M, BLOCK_N, USE_TMA)


# ----------------------------------------------------------------------------------------------
# Launch configs. Hopper configs follow ../shared/anchors (128×256×64, 3 stages, 8 warps reached
# 1.006–1.05× cuBLAS with descriptors and a persistent grid); the interpreter gets one small tile.
# No warp-specialized configs: on an H200 under triton 3.6 (2026-12-04, every config forced at ragged M) each
# `warp_specialize=True` variant of this loop wrote NaN or garbage into whole tile columns, intermittently, while
# the same tiles without it were exact; the tuner timed them and picked them (NaN in the LoRA benchmark's checks).

@functools.lru_cache(maxsize=None)
def _gemm_configs(use_tma: bool, elem_bytes: int, aligned: bool = True) -> list[dict]:
    """aligned=False (pointer loads only): K, N or a's row stride is not a multiple of 16 (widths_aligned), so the
    launch compiles the loads without the JIT's divisibility hint and every element of a tile carries its own address
    (sm_90 takes pointer loads where a row is not 16-byte aligned: such widths). The aligned list's configs then
    spill inside the K loop on sm_90 (tests/sm90_compile.py, triton 3.6 and 3.7 alike): the forward with K unaligned
    136 / 1008 / 576 B (IA3's K scale 272 / 968 / 680 B), dx with N unaligned 0 / 672–832 / 0 B. Half the K step or
    half the tile per warp keeps those addresses in registers: no spills in any of the 8 variants (LoRA, DoRA, IA3;
    forward and dx) with K, N or both unaligned. At aligned widths the aligned list is spill-free."""
    if INTERPRET:
        return [dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=2, FLATTEN=False,
                     num_warps=4, num_stages=1)]
    if elem_bytes == 4:
        return [dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, FLATTEN=False,
                     num_warps=4, num_stages=3)]
    if use_tma:
        # (BM, BN, BK, stages, warps, flatten)
        variants = [(128, 256, 64, 3, 8, True), (128, 256, 64, 3, 8, False), (128, 128, 64, 4, 8, True),
                    (128, 128, 128, 3, 8, False)]
        return [dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, FLATTEN=fl, num_warps=w, num_stages=s)
                for bm, bn, bk, s, w, fl in variants]
    return [dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, FLATTEN=False,
                 num_warps=w, num_stages=s)
            for bm, bn, bk, s, w in ([(128, 128, 64, 4, 8), (128, 256, 64, 3, 8), (64, 128, 64, 4, 4)] if aligned else
                                     [(128, 128, 32, 4, 8), (64, 128, 64, 4, 8), (128, 64, 64, 4, 8)])]


def widths_aligned(K: int, N: int, row_stride: int) -> bool:
    """Whether the GEMM's K, N and a's row stride are multiples of 16, as the JIT's divisibility hint needs (W's and
    the rank factors' row strides are K, N or R for the contiguous operands the ops pass)."""
    return (K | N | row_stride) % 16 == 0


FOLD_MAX_RANK = 64  # the folded GEMM keeps a BLOCK_M×R fp32 accumulator beside the main one: checked up to 64


@functools.lru_cache(maxsize=None)
def _fold_configs(use_tma: bool, elem_bytes: int, rank: int) -> list[dict]:
    """The folded GEMM's configs: the plain GEMM's that fit sm_90's shared memory and registers with the extra
    R-wide projection tile per stage and the BLOCK_M×R accumulator (tests/sm90_compile.py `lora` checks them)."""
    if INTERPRET or elem_bytes == 4:
        return _gemm_configs(use_tma, elem_bytes)
    if use_tma:
        # (BM, BN, BK, stages, warps, flatten)
        variants = ([(128, 256, 64, 3, 8, False), (128, 256, 64, 3, 8, True), (128, 128, 64, 4, 8, True)]
                    if rank <= 16 else
                    [(128, 128, 64, 4, 8, True), (128, 128, 64, 4, 8, False), (128, 256, 64, 2, 8, False)])
        return [dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, FLATTEN=fl, num_warps=w, num_stages=s)
                for bm, bn, bk, s, w, fl in variants]
    # pointer loads (unaligned rows), spill-free under triton 3.6 and 3.7 (sm_90 check): at R=16 128×128 needs 32-wide
    # k-steps (64: 8 B under 3.6) and 64×128 8 warps (4: 304 B under 3.6); at R=64 only 8-warp 128×64 / 64×128 stay
    # clean (128×64 on 4 warps: 352–376 B under 3.6). (Those figures are from before the check compiled unit strides
    # as constants, as a launch does; so compiled, all are clean at widths that are multiples of 16, and at other
    # widths, not in the check, the R=16 4-warp 128×64 spills 912 B forward / 480 B dx under both tritons.)
    return [dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, FLATTEN=False,
                 num_warps=w, num_stages=s)
            for bm, bn, bk, s, w in ([(128, 128, 32, 4, 8), (64, 128, 64, 4, 8), (128, 64, 64, 4, 4)] if rank <= 16
                                     else [(128, 64, 64, 4, 8), (64, 128, 64, 4, 8)])]


@functools.lru_cache(maxsize=None)
def dropout_dx_configs(use_tma: bool, elem_bytes: int, rank: int, aligned: bool = True) -> list[dict]:
    """The dx GEMM with a dropout tail, folded or not, keeps the masked tail in a second BLOCK_M×BLOCK_N fp32 tile:
    configs narrow enough not to spill (the plain GEMM's 128×256 ones spill ~4.7 KB; sm_90 check). aligned=False:
    widths that are not multiples of 16 (_gemm_configs), where the pointer list's 64×128 tile spills at R = 64
    (136 / 56 B under triton 3.7 / 3.6, folded 80 / 128 B) and 64×64 does not."""
    if INTERPRET or elem_bytes == 4:
        return _gemm_configs(use_tma, elem_bytes)
    # (BM, BN, BK, stages, warps); with descriptors the flattened 4-stage 128×128 one spills 40–96 B. Pointer loads:
    # 8-warp 64×128 / 128×64, the only ones spill-free under triton 3.6 too (128×128 8 B at R=16, 64×64 on 4 warps
    # 64 B at R=64, 128×64 8 B at R=64; numbers from before the check compiled unit strides as the launch does)
    variants = ([(128, 128, 64, 3, 8), (64, 128, 64, 4, 4), (128, 64, 64, 4, 4)] if use_tma else
                [(64, 128, 64, 4, 8), (128, 64, 64, 4, 8)] if rank <= 16 else
                [(64, 128, 64, 4, 8)] if aligned else [(64, 64, 64, 4, 8)])
    return [dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, FLATTEN=False,
                 num_warps=w, num_stages=s) for bm, bn, bk, s, w in variants]


# The dx GEMM's descriptor configs that leave an SM room for a rank reduction block beside each persistent GEMM block
# (fastft.ops.overlap; rank_ops.BESIDE_GEMM): at most ~213 KB of shared memory and 208 registers a thread on 8 warps,
# where the plain list's 128×256 flattened and 128×128×128 tiles take 225–229 KB of the SM's 228 (sm_90) and leave
# nothing. With a dropout tail, the 4-warp configs of dropout_dx_configs (the 8-warp one holds 216–224 registers a
# thread: 55–57 K of the SM's 64 K). tests/sm90_compile.py `overlap` checks that every pair fits.
_ROOMY_TMA = [(128, 256, 64, 3, 8, False), (128, 128, 64, 4, 8, True), (128, 256, 64, 2, 8, True)]


@functools.lru_cache(maxsize=None)
def _roomy_configs(use_tma: bool, elem_bytes: int, dropout: bool, rank: int, aligned: bool) -> list[dict]:
    """gemm_configs(..., leave_room=True) of the dx GEMM (not folded). Pointer loads (GPUs before sm_90, or widths
    that are not multiples of 16) keep their lists: the room is planned for sm_90's descriptor path alone."""
    if INTERPRET or elem_bytes == 4 or not use_tma:
        return gemm_configs(use_tma, elem_bytes, 0, dropout, rank, aligned)
    if dropout:
        return [c for c in dropout_dx_configs(use_tma, elem_bytes, rank) if c["num_warps"] == 4]
    return [dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, FLATTEN=fl, num_warps=w, num_stages=s)
            for bm, bn, bk, s, w, fl in _ROOMY_TMA]


def gemm_configs(use_tma: bool, elem_bytes: int, fold_rank: int = 0, dropout: bool = False, rank: int = 16,
                 aligned: bool = True, leave_room: bool = False) -> list[dict]:
    """Launch configs of _lora_gemm_kernel; fold_rank (the padded R) > 0: of its FOLD variant. With a dropout tail
    (dx, folded or not; `rank` the padded R): dropout_dx_configs. aligned: widths_aligned (the plain and the
    dropout-dx pointer lists; the fold lists are checked at aligned widths alone: the fold path is opt-in).
    leave_room: the dx GEMM with rank reductions beside it on another stream (_roomy_configs; not folded)."""
    if leave_room and not fold_rank:
        return _roomy_configs(use_tma, elem_bytes, dropout, rank, aligned)
    if dropout:
        return dropout_dx_configs(use_tma, elem_bytes, fold_rank or rank, use_tma or aligned)
    if not fold_rank:
        return _gemm_configs(use_tma, elem_bytes, use_tma or aligned)
    return _fold_configs(use_tma, elem_bytes, fold_rank)


# ----------------------------------------------------------------------------------------------
# Launchers (2-D operands, already validated).

def lora_gemm(a, b, lo, t, bias, *, b_nk: bool, p_drop: float = 0.0, seed: int = 0, col_scale=None,
              k_scale=None, leave_room: bool = False) -> torch.Tensor:
    """c = (a·diag(k_scale)·bᵀ + lo·tᵀ)·diag(col_scale) (+ bias), b logical [N,K], t logical [N,R]; tail masked
    by dropout if p_drop > 0. lo/t None: no tail. col_scale (N,) / k_scale (K,): fp32 contiguous vectors or None.

    b_nk: b is W stored [N,K] (and t is B [N,R]) — the forward; else b is W [K,N] seen transposed (and t
    is A [R,N]) — dx. lo is [M,R] contiguous with R = rank_pad(r).
    leave_room: configs that leave each SM room for a rank reduction on another stream (gemm_configs).
    """
    return _gemm(a, b, lo, t, None, bias, b_nk=b_nk, p_drop=p_drop, seed=seed, col_scale=col_scale,
                 k_scale=k_scale, fold_scale=1.0, leave_room=leave_room)


def lora_gemm_folded(a, b, p, t, bias, *, b_nk: bool, scale: float, p_drop: float = 0.0,
                     seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(c, lo) with lo = scale·a·p (in a's dtype, [M,R]) computed inside the GEMM's own K loop and
    c = lora_gemm(a, b, lo, t, bias, ...): the rank projection costs R more MMA columns, not a pass over a.

    b_nk (forward): p is A [R,K] (stored like b), t is B [N,R]; else (dx): p is B [K,R] and t is A [R,N].
    R = rank_pad(r) rows/columns of p and t, zero-padded. No dropout on a here (the forward's dropout acts on x
    before A: callers with dropout project with rank_project); p_drop masks the tail as in lora_gemm (dx).
    """
    R = p.shape[0] if b_nk else p.shape[1]
    lo = torch.empty((a.shape[0], R), device=a.device, dtype=a.dtype)
    c = _gemm(a, b, lo, t, p, bias, b_nk=b_nk, p_drop=p_drop, seed=seed, col_scale=None, k_scale=None,
              fold_scale=scale, leave_room=False)
    return c, lo


@on_operand_device
def _gemm(a, b, lo, t, proj, bias, *, b_nk, p_drop, seed, col_scale, k_scale, fold_scale,
          leave_room) -> torch.Tensor:
    """lora_gemm's and lora_gemm_folded's launch: proj None reads lo, else lo is written (FOLD)."""
    M, K = a.shape
    N = b.shape[0] if b_nk else b.shape[1]
    has_tail = lo is not None
    fold = proj is not None
    R = lo.shape[1] if has_tail else 16
    c = torch.empty((M, N), device=a.device, dtype=a.dtype)
    read_kn = (b,) + ((t,) if has_tail else ()) + ((proj,) if fold else ())  # what load_kn_block reads (WIDE)
    if not has_tail:
        lo = t = c  # never read
    if not fold:
        proj = c  # never read
    bias = unit_stride(bias)
    # logical b[n, k], t[n, r] and proj[k, r] strides, whatever the storage (one .stride() call each: host time)
    sa, sb, st, sp = a.stride(), b.stride(), t.stride(), proj.stride()
    stride_bn, stride_bk = sb if b_nk else sb[::-1]
    stride_tn, stride_tr = st if b_nk else st[::-1]
    stride_pr, stride_pk = sp if b_nk else sp[::-1]
    # lo is read through a descriptor (split) or stored with pointers (fold); proj is read through one (fold).
    # c is a fresh contiguous allocation (aligned): only its row pitch can rule descriptors out.
    described = (a, b) + ((t, proj) if fold else (lo, t) if has_tail else ())
    use_tma = (has_tma(a.device) and a.device.type not in _NO_TMA and (N * a.element_size()) % 16 == 0
               and all(tma_compatible(x) for x in described))
    if use_tma:
        ensure_descriptor_allocator()
    sms = device_sms(a.device)
    precision = dot_precision(a.dtype)

    def launch(cfg, use_tma=use_tma):
        tiles = cdiv(M, cfg["BLOCK_M"]) * cdiv(N, cfg["BLOCK_N"])
        grid = (max(1, min(sms, tiles)),)
        _lora_gemm_kernel[grid](
            a, b, lo, t, bias if bias is not None else c, c,
            col_scale if col_scale is not None else c, k_scale if k_scale is not None else c, proj,
            M, N, K,
            sa[0], sa[1], stride_bn, stride_bk, lo.stride(0), stride_tn, stride_tr, N,
            stride_pk, stride_pr,
            p_drop, seed, grid[0], fold_scale,
            HAS_BIAS=bias is not None, TAIL_DROPOUT=p_drop > 0.0, B_NK=b_nk,
            HAS_TAIL=has_tail, HAS_COL_SCALE=col_scale is not None, HAS_K_SCALE=k_scale is not None, FOLD=fold,
            USE_TMA=use_tma, UPCAST=upcast(a.dtype), DOT_PRECISION=precision,
            BLOCK_R=R, WIDE=not use_tma and wide_offsets(*read_kn), **cfg,
        )

    key = (bucket(M), N, K, R, a.dtype, b_nk, bias is not None, p_drop > 0.0, has_tail, col_scale is not None,
           k_scale is not None, fold, use_tma)
    name = "lora_gemm_folded" if fold else "lora_gemm"
    aligned = widths_aligned(K, N, sa[0])  # (each list has its own Tuner: a key never mixes the two)
    configs = gemm_configs(use_tma, a.element_size(), R if fold else 0, p_drop > 0.0, R, aligned, leave_room)
    try:
        tuner(name, configs).run(key, launch)
    except RuntimeError as err:
        if not use_tma or "no launch config compiled" not in str(err):
            raise
        # This triton cannot build the descriptor variant here: use pointer loads from now on.
        warnings.warn(f"fastft: tensor-descriptor GEMM unavailable ({err.__cause__!r}); using pointer loads")
        _NO_TMA.add(a.device.type)
        key = key[:-1] + (False,)
        tuner(name, gemm_configs(False, a.element_size(), R if fold else 0, p_drop > 0.0, R, aligned,
                                 leave_room)).run(key, lambda cfg: launch(cfg, False))
    return c


_NO_TMA: set[str] = set()  # device types where the descriptor GEMM failed to compile
