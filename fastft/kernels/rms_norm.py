"""RMSNorm in Triton, optionally fused with the residual add before it.

    h = x (+ residual)            the pre-norm stream, rounded to x's dtype once, as `residual + x` would be
    x̂ = h · rsqrt(mean(h²) + eps) in fp32
    y = (w + offset) · x̂

Two roundings, matching transformers: CAST_INPUT (Llama, Qwen, Mistral) rounds x̂ to h's dtype before the
multiply, `w · x̂.to(dtype)`, and stores y in promote(dtype, w.dtype); otherwise (Gemma, offset 1) the multiply
is fp32 and y is stored in h's dtype. Launchers take rows (M, N) with a unit last stride and any row stride.

Backward, per row, with g = dy·(w + offset) (fp32) and c = mean(g·x̂):  dh = rstd·(g − x̂·c), plus the incoming
gradient of h when h was returned. dw is a split reduction: each program accumulates its rows' dy·x̂ in fp32
registers and writes one partial row; the launcher sums the partials.
"""
from __future__ import annotations

import torch

from fastft.kernels.rounding import emulate_rtne, round_to
from fastft.kernels.launch import jit
from fastft.kernels.runtime import cdiv, device_sms, next_power_of_2, on_operand_device
from fastft.kernels.shared import unit_stride

import triton.language as tl


@jit
def _rms_norm_fwd_kernel(x_ptr, res_ptr, w_ptr, y_ptr, h_ptr, rstd_ptr, N, stride_x, stride_r, stride_y, stride_h,
                         eps, offset, HAS_RESIDUAL: tl.constexpr, CAST_INPUT: tl.constexpr, RTNE_X: tl.constexpr,
                         RTNE_Y: tl.constexpr, BLOCK_N: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    h = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_r + cols, mask=mask, other=0.0)
        h = round_to(h.to(tl.float32) + r.to(tl.float32), x_ptr.dtype.element_ty, RTNE_X)
        tl.store(h_ptr + row * stride_h + cols, h, mask=mask)
    hf = h.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(hf * hf, axis=0) / N + eps)
    tl.store(rstd_ptr + row, rstd)
    xhat = hf * rstd
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32) + offset
    if CAST_INPUT:
        xhat = round_to(xhat, x_ptr.dtype.element_ty, RTNE_X).to(tl.float32)
    tl.store(y_ptr + row * stride_y + cols, round_to(xhat * w, y_ptr.dtype.element_ty, RTNE_Y), mask=mask)


@jit
def _rms_norm_bwd_kernel(dy_ptr, h_ptr, w_ptr, rstd_ptr, dh_in_ptr, dx_ptr, dw_ptr, M, N, stride_dy, stride_h,
                         stride_dhi, stride_dx, offset, rows_per_program, HAS_DH: tl.constexpr,
                         NEED_DW: tl.constexpr, RTNE: tl.constexpr, BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32) + offset
    dw = tl.zeros([BLOCK_N], dtype=tl.float32)
    first = pid * rows_per_program
    for i in range(0, rows_per_program):
        row = first + i
        if row < M:
            r64 = row.to(tl.int64)
            dy = tl.load(dy_ptr + r64 * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
            h = tl.load(h_ptr + r64 * stride_h + cols, mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(rstd_ptr + row)
            xhat = h * rstd
            g = dy * w
            c = tl.sum(g * xhat, axis=0) / N
            dx = rstd * (g - xhat * c)
            if HAS_DH:
                dx += tl.load(dh_in_ptr + r64 * stride_dhi + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(dx_ptr + r64 * stride_dx + cols, round_to(dx, dx_ptr.dtype.element_ty, RTNE), mask=mask)
            if NEED_DW:
                dw += dy * xhat
    if NEED_DW:
        tl.store(dw_ptr + pid.to(tl.int64) * N + cols, dw, mask=mask)


def _warps(block_n: int) -> int:
    return min(max(block_n // 256, 1), 16)


@on_operand_device
def rms_norm_forward(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float, cast_input: bool,
                     out_dtype: torch.dtype, residual: torch.Tensor | None = None):
    """(y, h, rstd) for rows x (M, N); h is None without a residual (then h is x itself)."""
    M, N = x.shape
    weight = unit_stride(weight)
    block_n = next_power_of_2(N)
    y = torch.empty((M, N), dtype=out_dtype, device=x.device)
    rstd = torch.empty((M,), dtype=torch.float32, device=x.device)
    h = torch.empty_like(x, memory_format=torch.contiguous_format) if residual is not None else None
    if M == 0:
        return y, h, rstd
    res = residual if residual is not None else x
    h_arg = h if h is not None else y
    _rms_norm_fwd_kernel[(M,)](x, res, weight, y, h_arg, rstd, N, x.stride(0), res.stride(0), y.stride(0),
                               h_arg.stride(0), float(eps), float(offset), HAS_RESIDUAL=residual is not None,
                               CAST_INPUT=cast_input, RTNE_X=emulate_rtne(x.dtype),
                               RTNE_Y=emulate_rtne(out_dtype), BLOCK_N=block_n, num_warps=_warps(block_n))
    return y, h, rstd


@on_operand_device
def rms_norm_backward(dy: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor, offset: float,
                      dh_in: torch.Tensor | None, need_dw: bool):
    """(dh, dw): dh in h's dtype (the gradient of x and of the residual), dw in fp32 or None."""
    M, N = h.shape
    weight = unit_stride(weight)
    block_n = next_power_of_2(N)
    dx = torch.empty((M, N), dtype=h.dtype, device=h.device)
    programs = max(1, min(M, 4 * device_sms(h.device)))
    rows_per_program = cdiv(M, programs) if M else 0
    programs = cdiv(M, rows_per_program) if M else 1
    # every launched program writes its partial row: no memset unless nothing is launched (M == 0)
    alloc = torch.empty if M > 0 else torch.zeros
    partials = alloc((programs, N), dtype=torch.float32, device=h.device) if need_dw else dx
    if M > 0:
        dhi = dh_in if dh_in is not None else dy
        _rms_norm_bwd_kernel[(programs,)](dy, h, weight, rstd, dhi, dx, partials, M, N, dy.stride(0), h.stride(0),
                                          dhi.stride(0), dx.stride(0), float(offset), rows_per_program,
                                          HAS_DH=dh_in is not None, NEED_DW=need_dw, RTNE=emulate_rtne(h.dtype),
                                          BLOCK_N=block_n,
                                          num_warps=_warps(block_n))
    dw = partials.sum(0) if need_dw else None
    return dx, dw
