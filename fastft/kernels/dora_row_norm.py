"""DoRA's row norm  out[n] = ‖W_n + s·(B·A)_n‖²  (fp32), summed directly, tile by tile, split over K.

W + s·B·A (N×K) is never stored: a program owns BLOCK_N rows and a run of columns, forms each (BLOCK_N × BLOCK_K)
tile of W' = W + s·B·A in registers (B·A one rank-R dot) and adds its squares; torch adds the few K splits.
Summing W'² directly, rather than expanding ‖W‖² + 2s·ΣB∘(W·Aᵀ) + s²·B(A·Aᵀ)Bᵀ, keeps a row whose W' nearly
cancels exact: the expansion subtracts terms of size ‖W‖² and comes out 0 (σ = m/0 = inf) in half precision.
Cost: one read of W and N·K·R multiply-adds, what W·Aᵀ cost the expansion.
"""
from __future__ import annotations

import functools

import torch

from fastft.kernels.autotune import tuner
from fastft.kernels.launch import jit
from fastft.kernels.runtime import cdiv, INTERPRET, on_operand_device
from fastft.kernels.shared import bucket, dot_precision, split_partials, sum_partials, upcast

import triton.language as tl


@jit
def _row_sq_norm_kernel(
    w_ptr, a_ptr, b_ptr, part_ptr,
    N, K, cols_per_split, scaling,
    stride_wn, stride_wk,
    R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """part[split, N] = Σ over this split's columns of (W + s·B·A)² (fp32); A is (R, K), B (N, R), contiguous."""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, R)
    row_ok = rows < N
    w_rows = w_ptr + rows.to(tl.int64)[:, None] * stride_wn  # int64: row × K passes 2^31 for W ≥ 2^31 elements
    b = tl.load(b_ptr + rows[:, None] * R + offs_r[None, :], mask=row_ok[:, None], other=0.0)
    if UPCAST:
        b = b.to(tl.float32)
    col_start = pid_s * cols_per_split
    col_end = min(K, col_start + cols_per_split)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for off_k in range(col_start, col_end, BLOCK_K):
        cols = off_k + tl.arange(0, BLOCK_K)
        col_ok = cols < col_end
        w = tl.load(w_rows + cols.to(tl.int64)[None, :] * stride_wk,
                    mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
        a = tl.load(a_ptr + offs_r[:, None] * K + cols[None, :], mask=col_ok[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
        w_prime = w + scaling * tl.dot(b, a, input_precision=DOT_PRECISION)
        acc += tl.sum(w_prime * w_prime, axis=1)  # reduced every step: a 2-D accumulator spills on sm_90
    tl.store(part_ptr + pid_s * N + rows, acc, mask=row_ok)


@functools.lru_cache(maxsize=None)
def _configs() -> list[dict]:
    if INTERPRET:
        return [dict(BLOCK_N=32, BLOCK_K=32, PER_SM=1, num_warps=4, num_stages=1)]
    return [dict(BLOCK_N=bn, BLOCK_K=bk, PER_SM=f, num_warps=w, num_stages=s)
            for bn, bk, f, w, s in [(64, 128, 2, 8, 3), (128, 64, 2, 8, 3), (64, 64, 4, 8, 3), (32, 128, 4, 8, 3)]]


@on_operand_device
def row_sq_norm(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """Σ_k (W + s·B·A)²_nk per row as an fp32 vector (N,). weight (N, K), any strides; lora_A (R, K) and
    lora_B (N, R) contiguous, in weight's dtype, R a power of two ≥ 16 (zero-padded rank)."""
    N, K = weight.shape
    R = lora_A.shape[0]
    result = {}

    def launch(cfg):
        n_tiles = cdiv(N, cfg["BLOCK_N"])
        cfg, splits, cols_per_split, (part,) = split_partials(cfg, K, n_tiles, "BLOCK_K", weight.device, (N,))
        _row_sq_norm_kernel[(n_tiles, splits)](
            weight, lora_A, lora_B, part, N, K, cols_per_split, float(scaling), weight.stride(0), weight.stride(1),
            R=R, UPCAST=upcast(weight.dtype), DOT_PRECISION=dot_precision(weight.dtype), **cfg)
        result["out"] = sum_partials(part)

    if N == 0 or K == 0:
        return torch.zeros(N, device=weight.device, dtype=torch.float32)
    tuner("dora_row_sq_norm", _configs()).run((N, bucket(K), R, weight.dtype), launch)
    return result["out"]
