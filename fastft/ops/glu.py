"""Gated linear units: SwiGLU silu(gate)·up (Llama, Qwen, Mistral) and GeGLU gelu_tanh(gate)·up (Gemma).

`swiglu` / `geglu` validate once and dispatch: Triton (fastft.kernels.glu) on CUDA, the torch references
elsewhere. The backward recomputes the activation from the saved gate and up, so only the two inputs stay
alive. Under torch.autocast nothing changes dtype: silu, gelu and mul are not autocast ops in torch either.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fastft.ops.shared import as_rows, check, check_tensor, resolve_backend


def swiglu_reference(gate, up):
    return F.silu(gate) * up


def geglu_reference(gate, up):
    return F.gelu(gate, approximate="tanh") * up


class GLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up, gelu):
        from fastft.kernels.glu import glu_forward

        g2, u2 = as_rows(gate), as_rows(up)
        ctx.save_for_backward(g2, u2)
        ctx.meta = (gate.shape, gelu)
        return glu_forward(g2, u2, gelu).view(gate.shape)

    @staticmethod
    def backward(ctx, dy):
        from fastft.kernels.glu import glu_backward

        g2, u2 = ctx.saved_tensors
        shape, gelu = ctx.meta
        d_gate, d_up = glu_backward(as_rows(dy), g2, u2, gelu)
        return d_gate.view(shape), d_up.view(shape), None


def _glu(op, gate, up, gelu, backend):
    check_tensor(op, "gate", gate, dim=1)
    check_tensor(op, "up", up, dim=1)
    check(gate.shape == up.shape, f"{op}: `gate` {tuple(gate.shape)} and `up` {tuple(up.shape)} must have one shape")
    check(gate.dtype == up.dtype, f"{op}: `gate` is {gate.dtype} but `up` is {up.dtype}")
    check(gate.device == up.device, f"{op}: `gate` is on {gate.device} but `up` is on {up.device}")
    if resolve_backend(op, backend, gate.device) == "torch" or gate.numel() == 0:
        return (geglu_reference if gelu else swiglu_reference)(gate, up)
    with torch.autocast(gate.device.type, enabled=False):
        return GLUFunction.apply(gate, up, gelu)


def swiglu(gate, up, *, backend="auto"):
    """silu(gate)·up, elementwise; gate and up share shape and dtype."""
    return _glu("swiglu", gate, up, False, backend)


def geglu(gate, up, *, backend="auto"):
    """gelu(gate, approximate="tanh")·up, elementwise; gate and up share shape and dtype."""
    return _glu("geglu", gate, up, True, backend)
