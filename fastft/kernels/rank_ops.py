"""Triton kernels of the skinny rank-R passes of the fused LoRA linear (and of QLoRA, DoRA, the bottleneck adapter).

With x (M×K), dy (M×N), A (r×K), B (N×r), the rank padded to R = rank_pad(r) ≥ 16, the scaling s = a·b split
so that |a| ≤ 1 is s's mantissa and b a power of two applied to B in fp16 (fastft.ops.lora.split_scaling: xs never
exceeds peft's x·Aᵀ nor falls short of it by more than 2×; a = s, b = 1 in bf16 and fp32), B_p = b·B, c = a/(1-p):
forward   xs = c·(keep∘x)·Aᵀ                 rank_project: one skinny pass over x (M×R, kept for backward)
backward  g  = c·dy·B                        rank_project: one skinny pass over dy (M×R)
          dA = b·gᵀ·(keep∘x)                 rank_reduce (split over M)
          dB = b·dyᵀ·xs                      rank_reduce, or both in one launch: rank_reduce_pair
The big GEMMs with the rank tail (y, dx) are fastft.kernels.lora_gemm. The dropout mask `keep` is never stored:
every kernel regenerates it from the seed and the element's (row, column) index in x with Philox
(fastft.kernels.shared.dropout_keep); `dropout_mask` materialises it for tests. Launchers take 2-D operands,
pick configs and grids; validation lives in fastft.ops.
"""
from __future__ import annotations

import functools

import torch

from fastft.kernels.autotune import tuner
from fastft.kernels.shared import (bucket, dot_precision, dropout_keep, split_partials, sum_partials, upcast,
                                  wide_index)
from fastft.kernels.launch import jit
from fastft.kernels.runtime import (cdiv, INTERPRET, next_power_of_2, on_operand_device, triton, wide_columns,
                                   wide_offsets)

import triton.language as tl


@jit
def _rank_project_kernel(
    x_ptr, w_ptr, out_ptr,
    M, K, k_per_split,
    stride_xm, stride_xk, stride_wr, stride_wk, stride_os, stride_om,
    scale, p_drop, seed,
    DROPOUT: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, WIDE: tl.constexpr,
):
    """out[split, M, R] = scale · (keep∘x)[M, Ks] · w[R, Ks]ᵀ over this split's columns Ks of K (w any strides).
    WIDE: x's column offsets in int64 too (runtime.wide_columns; its rows always are).

    With one split this is the whole product; several splits (fp32 partials, summed after) put more
    loads in flight when M alone gives too few programs to saturate memory bandwidth.
    """
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = (pid * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)  # int64: row × stride passes 2^31 at scale
    offs_r = tl.arange(0, BLOCK_R)
    k_start = pid_k * k_per_split
    k_end = min(K, k_start + k_per_split)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for off_k in range(k_start, k_end, BLOCK_K):
        ks = off_k + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rows[:, None] * stride_xm + wide_index(ks, WIDE)[None, :] * stride_xk,
                    mask=(rows[:, None] < M) & (ks[None, :] < k_end), other=0.0)
        if DROPOUT:
            x = tl.where(dropout_keep(seed, rows, ks, K, p_drop), x, 0.0)
        w = tl.load(w_ptr + ks[:, None] * stride_wk + offs_r[None, :] * stride_wr,
                    mask=ks[:, None] < k_end, other=0.0)
        if UPCAST:
            x = x.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(x, w, acc, input_precision=DOT_PRECISION)
    acc = acc * scale
    out = out_ptr + pid_k * stride_os + rows[:, None] * stride_om + offs_r[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=rows[:, None] < M)


@triton.jit
def _reduce_rows(l_ptr, y_ptr, row_start, row_end, cols, N, stride_lm, stride_ym, stride_yn, p_drop, seed,
                 DROPOUT: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, WIDE: tl.constexpr):
    """l[rows, R]ᵀ · (keep∘y)[rows, cols] over rows [row_start, row_end), fp32 [R, BLOCK_N]. WIDE: int64 offsets
    (runtime.wide_offsets; int32 ones otherwise, as int64 ones spill the 64×128 tiles at R = 64 on sm_90)."""
    offs_r = tl.arange(0, BLOCK_R)
    cols = wide_index(cols, WIDE)  # the columns too: y may be column-major (any strides)
    acc = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32)
    for off_m in range(row_start, row_end, BLOCK_M):
        rows = off_m + tl.arange(0, BLOCK_M)
        if WIDE:
            rows = rows.to(tl.int64)
        in_rows = rows < row_end
        lo = tl.load(l_ptr + rows[:, None] * stride_lm + offs_r[None, :], mask=in_rows[:, None], other=0.0)
        y = tl.load(y_ptr + rows[:, None] * stride_ym + cols[None, :] * stride_yn,
                    mask=in_rows[:, None] & (cols[None, :] < N), other=0.0)
        if DROPOUT:
            y = tl.where(dropout_keep(seed, rows, cols, N, p_drop), y, 0.0)
        if UPCAST:
            lo = lo.to(tl.float32)
            y = y.to(tl.float32)
        acc = tl.dot(lo.T, y, acc, input_precision=DOT_PRECISION)
    return acc


@jit
def _rank_reduce_kernel(
    l_ptr, y_ptr, part_ptr,
    M, N, rows_per_split,
    stride_lm, stride_ym, stride_yn,
    p_drop, seed,
    DROPOUT: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, WIDE: tl.constexpr,
):
    """part[split, R, N] = l[rows, R]ᵀ · (keep∘y)[rows, N] over this split's rows (fp32 partial sums)."""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    row_start = pid_s * rows_per_split
    row_end = min(M, row_start + rows_per_split)
    acc = _reduce_rows(l_ptr, y_ptr, row_start, row_end, cols, N, stride_lm, stride_ym, stride_yn, p_drop, seed,
                       DROPOUT, UPCAST, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_R, WIDE)
    out = part_ptr + pid_s * BLOCK_R * N + offs_r[:, None] * N + cols[None, :]
    tl.store(out, acc, mask=cols[None, :] < N)


@jit
def _rank_reduce_pair_kernel(
    la_ptr, ya_ptr, parta_ptr, lb_ptr, yb_ptr, partb_ptr,
    M, NA, NB, tiles_a, rows_per_split,
    stride_lam, stride_yam, stride_yan, stride_lbm, stride_ybm, stride_ybn,
    p_drop, seed,
    DROPOUT: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, WIDE: tl.constexpr,
):
    """Two reductions over the same rows in one launch (the LoRA backward's dA and dB): column tiles
    [0, tiles_a) give parta[split, R, NA] = laᵀ·(keep∘ya) (dropout on ya only), the rest partb[split, NB, R] =
    (lbᵀ·yb)ᵀ = ybᵀ·lb, stored transposed: the LoRA dB in B's own (N, R) layout."""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_r = tl.arange(0, BLOCK_R)
    row_start = pid_s * rows_per_split
    row_end = min(M, row_start + rows_per_split)
    if pid_n < tiles_a:
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = _reduce_rows(la_ptr, ya_ptr, row_start, row_end, cols, NA, stride_lam, stride_yam, stride_yan,
                           p_drop, seed, DROPOUT, UPCAST, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_R, WIDE)
        tl.store(parta_ptr + pid_s * BLOCK_R * NA + offs_r[:, None] * NA + cols[None, :], acc,
                 mask=cols[None, :] < NA)
    else:
        cols = (pid_n - tiles_a) * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = _reduce_rows(lb_ptr, yb_ptr, row_start, row_end, cols, NB, stride_lbm, stride_ybm, stride_ybn,
                           p_drop, seed, False, UPCAST, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_R, WIDE)
        tl.store(partb_ptr + pid_s * BLOCK_R * NB + cols[None, :] * BLOCK_R + offs_r[:, None], acc,
                 mask=cols[None, :] < NB)


@jit
def _dropout_mask_kernel(out_ptr, M, K, p_drop, seed, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    keep = dropout_keep(seed, rows, cols, K, p_drop)
    tl.store(out_ptr + rows[:, None] * K + cols[None, :], keep.to(tl.int8),
             mask=(rows[:, None] < M) & (cols[None, :] < K))


# ----------------------------------------------------------------------------------------------
# Launch configs; the interpreter gets one small tile.

@functools.lru_cache(maxsize=None)
def project_configs(elem_bytes: int, dropout: bool = False) -> list[dict]:
    """rank_project's configs; with dropout (Philox on every loaded x element costs registers: 64×128 with 4 warps
    spills 264–384 B on sm_90, with 8 warps 8 B at R = 64 under triton 3.6) 64-wide steps or 32-row tiles."""
    if INTERPRET:
        return [dict(BLOCK_M=32, BLOCK_K=32, SPLIT_K=1, num_warps=4, num_stages=1)]
    variants = ([(64, 64, 1, 8, 4), (32, 128, 1, 4, 4), (64, 64, 1, 4, 4), (64, 64, 4, 8, 4), (32, 128, 4, 4, 4)]
                if dropout else
                [(64, 128, 1, 4, 4), (32, 256, 1, 4, 4), (16, 256, 1, 4, 4), (64, 128, 2, 4, 4), (64, 128, 4, 4, 4),
                 (128, 64, 4, 8, 4)])
    return [dict(BLOCK_M=bm, BLOCK_K=bk, SPLIT_K=sk, num_warps=w, num_stages=s) for bm, bk, sk, w, s in variants]


# The one config of the reductions that run beside the dx GEMM (fastft.ops.overlap): a 32×64 tile on 4 warps, 2 stages,
# ≤ 16 KB of shared memory and ≤ 128 registers a thread at R ≤ 64, so that a block fits on an SM beside one of the
# GEMM's persistent blocks (tests/sm90_compile.py `overlap` checks every pair). Untimed: one config, and a timing
# beside a running GEMM would time the GEMM too.
BESIDE_GEMM = dict(BLOCK_M=32, BLOCK_N=64, PER_SM=2, num_warps=4, num_stages=2)


@functools.lru_cache(maxsize=None)
def reduce_configs(elem_bytes: int, dropout: bool = False, beside_gemm: bool = False) -> list[dict]:
    """rank_reduce's configs (PER_SM: how many programs per SM the M-split aims for); with dropout (Philox on every
    loaded y element: wider tiles spill 400–1600 B on sm_90) narrower ones; beside_gemm: [BESIDE_GEMM]."""
    if INTERPRET:
        return [dict(BLOCK_M=32, BLOCK_N=32, PER_SM=2, num_warps=4, num_stages=1)]
    if beside_gemm:
        return [dict(BESIDE_GEMM)]
    variants = (_DROPOUT_REDUCE if dropout else
                [(64, 128, 2, 4, 4), (64, 128, 4, 4, 4), (128, 64, 4, 4, 4), (32, 128, 4, 4, 4), (128, 128, 2, 8, 3)])
    return [dict(BLOCK_M=bm, BLOCK_N=bn, PER_SM=f, num_warps=w, num_stages=s) for bm, bn, f, w, s in variants]


# (BM, BN, PER_SM, warps, stages): no spills under triton 3.6 or 3.7 (64×64 and 32×128 on 4 warps spill 40–160 B
# under 3.6, the GPU machine's version)
_DROPOUT_REDUCE = [(64, 64, 4, 8, 4), (32, 128, 4, 8, 4), (32, 64, 4, 4, 4)]


@functools.lru_cache(maxsize=None)
def pair_reduce_configs(elem_bytes: int, dropout: bool, beside_gemm: bool = False) -> list[dict]:
    """rank_reduce_pair's configs: rank_reduce's but 128×64 (spills at R=64) and 128×128 (8 B at R=16 under
    triton 3.6), or with dropout (or beside_gemm) rank_reduce's; no spills on sm_90 (tests/sm90_compile.py)."""
    if INTERPRET or dropout or beside_gemm:
        return reduce_configs(elem_bytes, dropout, beside_gemm)
    variants = [(64, 128, 2, 4, 4), (64, 128, 4, 4, 4), (32, 128, 4, 4, 4), (64, 128, 2, 8, 4)]
    return [dict(BLOCK_M=bm, BLOCK_N=bn, PER_SM=f, num_warps=w, num_stages=s) for bm, bn, f, w, s in variants]


def rank_pad(r: int) -> int:
    """The padded rank R: a power of two ≥ 16, so every rank-R step is one full tensor-core tile."""
    return max(16, next_power_of_2(r))


# ----------------------------------------------------------------------------------------------
# Launchers (2-D operands, already validated).

@on_operand_device
def rank_project(x, w, *, scale: float, p_drop: float = 0.0, seed: int = 0,
                 out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """out[M,R] = scale·(keep∘x)·wᵀ in out_dtype (default x's dtype; the fp32 accumulator rounded once), w logical
    [R,K] (pass B.t() for dy·B); R = w.shape[0]."""
    M, K = x.shape
    R = w.shape[0]
    sx, sw = x.stride(), w.stride()
    out_dtype = x.dtype if out_dtype is None else out_dtype
    result = {}

    def launch(cfg):
        block_k = cfg["BLOCK_K"]
        splits = min(cfg["SPLIT_K"], cdiv(K, block_k))
        k_per_split = cdiv(cdiv(K, splits), block_k) * block_k
        splits = cdiv(K, k_per_split)
        if splits == 1:  # the product itself, in out_dtype
            out = torch.empty((M, R), device=x.device, dtype=out_dtype)
            stride_os = 0
        else:  # fp32 partials, summed after
            out = torch.empty((splits, M, R), device=x.device, dtype=torch.float32)
            stride_os = M * R
        _rank_project_kernel[(cdiv(M, cfg["BLOCK_M"]), splits)](
            x, w, out, M, K, k_per_split,
            sx[0], sx[1], sw[0], sw[1], stride_os, R,
            scale, p_drop, seed,
            DROPOUT=p_drop > 0.0, UPCAST=upcast(x.dtype), DOT_PRECISION=dot_precision(x.dtype),
            BLOCK_M=cfg["BLOCK_M"], BLOCK_K=block_k, BLOCK_R=R, WIDE=wide_columns(x), num_warps=cfg["num_warps"],
            num_stages=cfg["num_stages"],
        )
        result["out"] = out if splits == 1 else out.sum(0).to(out_dtype)

    key = (bucket(M), K, R, x.dtype, p_drop > 0.0)
    tuner("rank_project", project_configs(x.element_size(), p_drop > 0.0)).run(key, launch)
    return result["out"]


@on_operand_device
def rank_reduce(lo, y, *, p_drop: float = 0.0, seed: int = 0, beside_gemm: bool = False) -> torch.Tensor:
    """loᵀ·(keep∘y) in fp32, shape [R, N]: the weight gradients of the rank-R factors. beside_gemm: launched to run
    beside a GEMM on another stream (fastft.ops.overlap): the small BESIDE_GEMM tile."""
    M, N = y.shape
    R = lo.shape[1]
    result = {}

    def launch(cfg):
        n_tiles = cdiv(N, cfg["BLOCK_N"])
        cfg, splits, rows_per_split, (part,) = split_partials(cfg, M, n_tiles, "BLOCK_M", y.device, (R, N))
        _rank_reduce_kernel[(n_tiles, splits)](
            lo, y, part, M, N, rows_per_split,
            lo.stride(0), y.stride(0), y.stride(1),
            p_drop, seed,
            DROPOUT=p_drop > 0.0, UPCAST=upcast(y.dtype), DOT_PRECISION=dot_precision(y.dtype),
            BLOCK_R=R, WIDE=wide_offsets(lo, y), **cfg,
        )
        result["out"] = sum_partials(part)

    key = (bucket(M), N, R, y.dtype, p_drop > 0.0)
    tuner("rank_reduce", reduce_configs(y.element_size(), p_drop > 0.0, beside_gemm)).run(key, launch)
    return result["out"]


@on_operand_device
def rank_reduce_pair(la, ya, lb, yb, *, p_drop: float = 0.0, seed: int = 0,
                     beside_gemm: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(laᵀ·(keep∘ya), ybᵀ·lb) in fp32, shapes [R, NA] and [NB, R], in one launch: rank_reduce twice over the same
    M rows (the LoRA backward's dA = gᵀ·(keep∘x) and dB = dyᵀ·xs, the latter already in B's (N, R) layout: a
    transposed gradient would cost autograd a copy into the parameter's layout). beside_gemm: as rank_reduce."""
    M, NA = ya.shape
    NB = yb.shape[1]
    R = la.shape[1]
    result = {}

    def launch(cfg):
        tiles_a, tiles_b = cdiv(NA, cfg["BLOCK_N"]), cdiv(NB, cfg["BLOCK_N"])
        cfg, splits, rows_per_split, (part_a, part_b) = split_partials(cfg, M, tiles_a + tiles_b, "BLOCK_M",
                                                                       ya.device, (R, NA), (NB, R))
        _rank_reduce_pair_kernel[(tiles_a + tiles_b, splits)](
            la, ya, part_a, lb, yb, part_b, M, NA, NB, tiles_a, rows_per_split,
            la.stride(0), ya.stride(0), ya.stride(1), lb.stride(0), yb.stride(0), yb.stride(1),
            p_drop, seed,
            DROPOUT=p_drop > 0.0, UPCAST=upcast(ya.dtype), DOT_PRECISION=dot_precision(ya.dtype),
            BLOCK_R=R, WIDE=wide_offsets(la, ya, lb, yb), **cfg,
        )
        result["out"] = (sum_partials(part_a), sum_partials(part_b))

    key = (bucket(M), NA, NB, R, ya.dtype, p_drop > 0.0)
    tuner("rank_reduce_pair", pair_reduce_configs(ya.element_size(), p_drop > 0.0, beside_gemm)).run(key, launch)
    return result["out"]


@on_operand_device
def dropout_mask(seed: int, M: int, K: int, p_drop: float, device) -> torch.Tensor:
    """The keep-mask (M×K, bool) every kernel regenerates for this seed: for tests and debugging."""
    out = torch.empty((M, K), dtype=torch.int8, device=device)
    grid = (cdiv(M, 32), cdiv(K, 32))
    _dropout_mask_kernel[grid](out, M, K, p_drop, seed, BLOCK_M=32, BLOCK_K=32)
    return out.bool()
