"""Triton kernels of the bottleneck adapter  y = h + act(h·Dᵀ + b_d)·Uᵀ + b_u  (Houlsby / Pfeiffer).

Shapes: h (M×N), D (R×N) down-projection, U (N×R) up-projection, R the bottleneck padded to a power of two ≥ 16
with zero rows/columns (a padded unit has p = 0 + 0 and a zero column of U, so it adds nothing).

forward   p = h·Dᵀ + b_d,  z = act(p)          `_down_act_kernel`: one skinny pass over h, bias and activation
                                               in its epilogue (z and p are M×R, kept for backward;
                                               relu keeps z alone: z > 0 where p > 0)
          y = h + z·Uᵀ + b_u                   `_up_residual_kernel`: R reduction steps, the residual h and
                                               the bias added in the epilogue
backward  dz = dy·U                            rank_ops.rank_project
          dp = dz ∘ act'(p)                    M×R, torch
          dh = dy + dp·D                       `_up_residual_kernel` again (residual dy, t = Dᵀ)
          dU = dyᵀ·z,  dD = dpᵀ·h              rank_ops.rank_reduce (split over M)
Activations without libdevice: relu, silu, gelu_tanh and tanh (fastft.kernels.shared).
"""
from __future__ import annotations

import functools

import torch

from fastft.kernels.autotune import tuner
from fastft.kernels.launch import jit
from fastft.kernels.runtime import cdiv, INTERPRET, on_operand_device, triton, wide_columns
from fastft.kernels.shared import bucket, dot_precision, gelu_tanh, tanh, unit_stride, upcast, wide_index

import triton.language as tl

ACTIVATIONS = ("relu", "silu", "gelu_tanh", "tanh")


@triton.jit
def _activate(p, ACT: tl.constexpr):
    if ACT == "relu":
        return tl.maximum(p, 0.0)
    elif ACT == "silu":
        return p / (1.0 + tl.exp(-p))
    elif ACT == "gelu_tanh":
        return gelu_tanh(p, False)[0]
    else:
        return tanh(p)


@jit
def _down_act_kernel(
    h_ptr, d_ptr, bias_ptr, z_ptr, p_ptr,
    M, N,
    stride_hm, stride_hn, stride_dr, stride_dn,
    ACT: tl.constexpr, HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, WIDE: tl.constexpr,
):
    """p[M,R] = h[M,N]·d[R,N]ᵀ (+ bias), z = act(p); both stored row-major with row stride R. WIDE: h's column
    offsets in int64 too (runtime.wide_columns)."""
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)  # row × stride passes 2^31 at scale
    offs_r = tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for off_n in range(0, N, BLOCK_N):
        cols = off_n + tl.arange(0, BLOCK_N)
        h = tl.load(h_ptr + rows[:, None] * stride_hm + wide_index(cols, WIDE)[None, :] * stride_hn,
                    mask=(rows[:, None] < M) & (cols[None, :] < N), other=0.0)
        d = tl.load(d_ptr + cols[:, None] * stride_dn + offs_r[None, :] * stride_dr, mask=cols[:, None] < N,
                    other=0.0)
        if UPCAST:
            h = h.to(tl.float32)
            d = d.to(tl.float32)
        acc = tl.dot(h, d, acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_r).to(tl.float32)[None, :]
    z = _activate(acc, ACT)
    out = rows[:, None] * BLOCK_R + offs_r[None, :]
    tl.store(p_ptr + out, acc.to(p_ptr.dtype.element_ty), mask=rows[:, None] < M)
    tl.store(z_ptr + out, z.to(z_ptr.dtype.element_ty), mask=rows[:, None] < M)


@jit
def _up_residual_kernel(
    res_ptr, l_ptr, t_ptr, bias_ptr, out_ptr,
    M, N,
    stride_rm, stride_rn, stride_lm, stride_tn, stride_tr, stride_om,
    HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, WIDE: tl.constexpr,
):
    """out[M,N] = res[M,N] + l[M,R]·t[N,R]ᵀ (+ bias): R reduction steps, residual and bias in the epilogue. WIDE: res's
    column offsets in int64 too (runtime.wide_columns)."""
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)  # row × stride passes 2^31 at scale
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    lo = tl.load(l_ptr + rows[:, None] * stride_lm + offs_r[None, :], mask=rows[:, None] < M, other=0.0)
    tr = tl.load(t_ptr + offs_r[:, None] * stride_tr + cols[None, :] * stride_tn, mask=cols[None, :] < N, other=0.0)
    if UPCAST:
        lo = lo.to(tl.float32)
        tr = tr.to(tl.float32)
    acc = tl.dot(lo, tr, input_precision=DOT_PRECISION)
    mask = (rows[:, None] < M) & (cols[None, :] < N)
    res = res_ptr + rows[:, None] * stride_rm + wide_index(cols, WIDE)[None, :] * stride_rn
    acc += tl.load(res, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


@functools.lru_cache(maxsize=None)
def _down_configs(aligned: bool = True) -> list[dict]:
    """aligned=False: h's width N or row stride is not a multiple of 16, so the launch compiles h's loads without the
    JIT's divisibility hint and each element carries its own address; the 4-warp 64×128 / 32×256 tiles then spill
    296 / 144–160 B inside the N loop on sm_90 (triton 3.6 and 3.7; tests/sm90_compile.py), their 8-warp twins
    (half the elements a thread) none."""
    if INTERPRET:
        return [dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=1)]
    warps = 4 if aligned else 8
    return [dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=s)
            for bm, bn, w, s in [(64, 128, warps, 4), (32, 256, warps, 4), (128, 64, 8, 4), (16, 256, 4, 4)]]


@functools.lru_cache(maxsize=None)
def _up_configs() -> list[dict]:
    if INTERPRET:
        return [dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=1)]
    return [dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=s)
            for bm, bn, w, s in [(64, 128, 4, 2), (128, 64, 8, 2), (64, 64, 4, 2), (32, 128, 4, 2)]]


@on_operand_device
def down_act(h: torch.Tensor, d_pad: torch.Tensor, bias_pad: torch.Tensor | None, activation: str):
    """(z, p), each [M, R] in h's dtype: p = h·d_padᵀ + bias_pad, z = act(p). d_pad [R, N], bias_pad [R] fp32."""
    M, N = h.shape
    R = d_pad.shape[0]
    z = torch.empty((M, R), device=h.device, dtype=h.dtype)
    p = torch.empty_like(z)

    def launch(cfg):
        _down_act_kernel[(cdiv(M, cfg["BLOCK_M"]),)](
            h, d_pad, bias_pad if bias_pad is not None else z, z, p, M, N,
            h.stride(0), h.stride(1), d_pad.stride(0), d_pad.stride(1),
            ACT=activation, HAS_BIAS=bias_pad is not None, UPCAST=upcast(h.dtype),
            DOT_PRECISION=dot_precision(h.dtype), BLOCK_R=R, WIDE=wide_columns(h), **cfg)

    aligned = (N | h.stride(0)) % 16 == 0  # (each list has its own Tuner: a key never mixes the two)
    tuner("adapter_down_act", _down_configs(aligned)).run((bucket(M), N, R, h.dtype, activation), launch)
    return z, p


@on_operand_device
def up_residual(res: torch.Tensor, lo: torch.Tensor, t: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """res + lo·tᵀ (+ bias): res [M, N], lo [M, R] contiguous, t logical [N, R] (any strides), bias [N] or None."""
    M, N = res.shape
    R = lo.shape[1]
    bias = unit_stride(bias)
    out = torch.empty((M, N), device=res.device, dtype=res.dtype)

    def launch(cfg):
        _up_residual_kernel[(cdiv(M, cfg["BLOCK_M"]), cdiv(N, cfg["BLOCK_N"]))](
            res, lo, t, bias if bias is not None else out, out, M, N,
            res.stride(0), res.stride(1), lo.stride(0), t.stride(0), t.stride(1), out.stride(0),
            HAS_BIAS=bias is not None, UPCAST=upcast(res.dtype), DOT_PRECISION=dot_precision(res.dtype),
            BLOCK_R=R, WIDE=wide_columns(res), **cfg)

    tuner("adapter_up_residual", _up_configs()).run((bucket(M), N, R, res.dtype, bias is not None), launch)
    return out
