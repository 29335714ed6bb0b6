"""x·Wᵀ + b over an NF4 weight in plain torch, W dequantized in forward and again in backward: autograd through
F.linear on the dequantized W would keep the dense W of every layer alive until backward (QLoRA and QDoRA above
plain LoRA's and DoRA's memory). The torch backend's base term for fastft.ops.qlora and fastft.ops.dora."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fastft.ops.compiled import compiling
from fastft.ops.shared import as_rows, rows_to, under_func_transform


def bias_as(bias, x):
    """The fused kernels add any float bias in fp32; the references match that by casting it to x's dtype."""
    return bias if bias is None or bias.dtype == x.dtype else bias.to(x.dtype)


class NF4MatmulTorch(torch.autograd.Function):
    """Eager only: traced code takes F.linear (the compiler decides what it saves)."""

    @staticmethod
    def forward(ctx, x, qweight, bias):
        ctx.qweight, ctx.x_shape = qweight, x.shape
        return F.linear(as_rows(x), qweight.dequantize(x.dtype), bias)  # rows: viewed outside (rows_to)

    @staticmethod
    def backward(ctx, dy):  # plain torch ops: differentiable again (create_graph), as backend="torch" promises
        dx = (dy @ ctx.qweight.dequantize(dy.dtype)).view(ctx.x_shape) if ctx.needs_input_grad[0] else None
        db = dy.sum(0) if ctx.needs_input_grad[2] else None
        return dx, None, db


def nf4_matmul_torch(x, qweight, bias):
    """x·Wᵀ + b, W = qweight dequantized to x's dtype (bias cast to it too)."""
    if compiling() or not torch.is_grad_enabled() or under_func_transform():  # (no vmap / jvp rule of its own)
        return F.linear(x, qweight.dequantize(x.dtype), bias_as(bias, x))
    return rows_to(NF4MatmulTorch.apply(x, qweight, bias_as(bias, x)), x)
