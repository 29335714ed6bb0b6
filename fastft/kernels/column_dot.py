"""Per-column dot products  out[n] = Σ_m a[m, n]·b[m, n]  (fp32), split over M.

The gradient of a per-column scale (DoRA's magnitude m, IA3's vector l) is such a sum over tokens of the
output gradient times the unscaled output. One pass over a and b: programs own a column tile and a run of
rows (a split-M reduction like rank_reduce), write fp32 partial sums, and torch adds the few splits.
"""
from __future__ import annotations

import functools

import torch

from fastft.kernels.autotune import tuner
from fastft.kernels.launch import jit
from fastft.kernels.runtime import cdiv, INTERPRET, on_operand_device, wide_columns
from fastft.kernels.shared import bucket, split_partials, sum_partials, wide_index

import triton.language as tl


@jit
def _column_dot_kernel(
    a_ptr, b_ptr, part_ptr,
    M, N, rows_per_split,
    stride_am, stride_an, stride_bm, stride_bn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, WIDE: tl.constexpr,
):
    """part[split, N] = Σ over this split's rows of a·b (fp32). WIDE: int64 column offsets too (runtime.wide_columns:
    a column stride other than 1 on an operand past 2^31 elements)."""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_offs = wide_index(cols, WIDE)
    row_start = pid_s * rows_per_split
    row_end = min(M, row_start + rows_per_split)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for off_m in range(row_start, row_end, BLOCK_M):
        rows = (off_m + tl.arange(0, BLOCK_M)).to(tl.int64)  # int64: row × stride passes 2^31 at scale
        mask = (rows[:, None] < row_end) & (cols[None, :] < N)
        a = tl.load(a_ptr + rows[:, None] * stride_am + col_offs[None, :] * stride_an, mask=mask, other=0.0)
        b = tl.load(b_ptr + rows[:, None] * stride_bm + col_offs[None, :] * stride_bn, mask=mask, other=0.0)
        acc += a.to(tl.float32) * b.to(tl.float32)
    tl.store(part_ptr + pid_s * N + cols, tl.sum(acc, axis=0), mask=cols < N)


@functools.lru_cache(maxsize=None)
def _configs() -> list[dict]:
    if INTERPRET:
        return [dict(BLOCK_M=32, BLOCK_N=32, PER_SM=1, num_warps=4, num_stages=1)]
    return [dict(BLOCK_M=bm, BLOCK_N=bn, PER_SM=f, num_warps=w, num_stages=s)
            for bm, bn, f, w, s in [(32, 128, 4, 4, 2), (64, 64, 4, 4, 2), (16, 256, 8, 4, 2), (32, 128, 8, 4, 3)]]


@on_operand_device
def column_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Σ_m a[m, n]·b[m, n] for 2-D a, b of one shape (any strides), as an fp32 vector of length N."""
    M, N = a.shape
    result = {}

    def launch(cfg):
        n_tiles = cdiv(N, cfg["BLOCK_N"])
        cfg, splits, rows_per_split, (part,) = split_partials(cfg, M, n_tiles, "BLOCK_M", a.device, (N,))
        _column_dot_kernel[(n_tiles, splits)](
            a, b, part, M, N, rows_per_split, a.stride(0), a.stride(1), b.stride(0), b.stride(1),
            WIDE=wide_columns(a, b), **cfg)
        result["out"] = sum_partials(part)

    if M == 0:
        return torch.zeros(N, device=a.device, dtype=torch.float32)
    tuner("column_dot", _configs()).run((bucket(M), N, a.dtype, b.dtype), launch)
    return result["out"]
