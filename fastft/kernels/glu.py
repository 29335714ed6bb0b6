"""Gated linear units in Triton: SwiGLU silu(gate)·up and GeGLU gelu_tanh(gate)·up, forward and backward.

The backward recomputes the activation from the saved gate and up (no activation tensor is kept):

    a = act(gate),  y = a·up          d_up = dy·a,   d_gate = dy·up·act'(gate)
    silu:       a = g·σ(g)                     act' = σ(g)·(1 + g·σ(−g))
    gelu_tanh:  a = g·σ(2u)                    act' = σ(2u)·(1 + 2g·σ(−2u)·u')     (fastft.kernels.shared.gelu_tanh)
                u = √(2/π)(g + 0.044715g³),    u' = √(2/π)(1 + 3·0.044715g²)

fp32 inside, one rounding per output; no libdevice (σ through tl.exp). Elementwise over rows (M, N) with a
unit last stride and any row strides; a 2-D grid of (row, column block) programs.
"""
from __future__ import annotations

import torch

from fastft.kernels.rounding import emulate_rtne, round_to
from fastft.kernels.launch import jit
from fastft.kernels.runtime import cdiv, next_power_of_2, on_operand_device, triton
from fastft.kernels.shared import gelu_tanh

import triton.language as tl


@triton.jit
def _act_and_grad(g, GELU: tl.constexpr, NEED_GRAD: tl.constexpr):
    if GELU:
        a, da = gelu_tanh(g, NEED_GRAD)
    else:
        sig = tl.sigmoid(g)
        a = g * sig
        if NEED_GRAD:  # 1 − σ(g) as σ(−g): no cancellation where σ(g) is near 1
            da = sig * (1.0 + g * tl.sigmoid(-g))
        else:
            da = a
    return a, da


@jit
def _glu_fwd_kernel(gate_ptr, up_ptr, y_ptr, N, stride_g, stride_u, stride_y, GELU: tl.constexpr,
                    RTNE: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N
    g = tl.load(gate_ptr + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
    a, _ = _act_and_grad(g, GELU, False)
    tl.store(y_ptr + row * stride_y + cols, round_to(a * u, y_ptr.dtype.element_ty, RTNE), mask=mask)


@jit
def _glu_bwd_kernel(dy_ptr, gate_ptr, up_ptr, dg_ptr, du_ptr, N, stride_dy, stride_g, stride_u, stride_dg, stride_du,
                    GELU: tl.constexpr, RTNE: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N
    dy = tl.load(dy_ptr + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(gate_ptr + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
    a, da = _act_and_grad(g, GELU, True)
    tl.store(dg_ptr + row * stride_dg + cols, round_to(dy * u * da, dg_ptr.dtype.element_ty, RTNE), mask=mask)
    tl.store(du_ptr + row * stride_du + cols, round_to(dy * a, du_ptr.dtype.element_ty, RTNE), mask=mask)


def _block(n: int) -> int:
    return min(next_power_of_2(n), 1024)


@on_operand_device
def glu_forward(gate: torch.Tensor, up: torch.Tensor, gelu: bool) -> torch.Tensor:
    M, N = gate.shape
    y = torch.empty((M, N), dtype=gate.dtype, device=gate.device)
    if M * N:
        block = _block(N)
        _glu_fwd_kernel[(M, cdiv(N, block))](gate, up, y, N, gate.stride(0), up.stride(0), y.stride(0), GELU=gelu,
                                             RTNE=emulate_rtne(y.dtype), BLOCK=block, num_warps=4)
    return y


@on_operand_device
def glu_backward(dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, gelu: bool):
    M, N = gate.shape
    d_gate = torch.empty((M, N), dtype=gate.dtype, device=gate.device)
    d_up = torch.empty((M, N), dtype=up.dtype, device=up.device)
    if M * N:
        block = _block(N)
        _glu_bwd_kernel[(M, cdiv(N, block))](dy, gate, up, d_gate, d_up, N, dy.stride(0), gate.stride(0), up.stride(0),
                                             d_gate.stride(0), d_up.stride(0), GELU=gelu, RTNE=emulate_rtne(gate.dtype),
                                             BLOCK=block, num_warps=4)
    return d_gate, d_up
