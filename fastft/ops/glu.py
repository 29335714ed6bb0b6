"""Gated linear units: SwiGLU silu(gate)·up (Llama, Qwen, Mistral) and GeGLU gelu_tanh(gate)·up (Gemma).

`swiglu` / `geglu` validate once and dispatch: Triton (fastft.kernels.glu) on CUDA, the torch references
elsewhere. The backward recomputes the activation from the saved gate and up, so only the two inputs stay
alive. Under torch.autocast nothing changes dtype: silu, gelu and mul are not autocast ops in torch either.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fastft.ops.compiled import compiling
from fastft.ops.shared import as_rows, autocast_off, check, check_tensor, first_order_only, resolve_backend, rows_to


def swiglu_reference(gate, up):
    return F.silu(gate) * up


def geglu_reference(gate, up):
    return F.gelu(gate, approximate="tanh") * up


def _forward(gate, up, gelu):
    from fastft.kernels.glu import glu_forward

    return glu_forward(as_rows(gate), as_rows(up), gelu).view(*gate.shape)


def _backward(dy, g2, u2, shape, gelu):
    """(d_gate, d_up) in gate's shape; g2, u2: gate and up as rows."""
    from fastft.kernels.glu import glu_backward

    d_gate, d_up = glu_backward(as_rows(dy), g2, u2, gelu)
    return d_gate.view(*shape), d_up.view(*shape)  # (unpacked: a torch.Size argument costs ~1.5 µs more)


class GLUFunction(torch.autograd.Function):
    """The eager door (fastft.ops.compiled)."""

    @staticmethod
    def forward(ctx, gate, up, gelu):
        from fastft.kernels.glu import glu_forward

        g2, u2 = as_rows(gate), as_rows(up)
        ctx.save_for_backward(g2, u2)
        ctx.meta = (gate.shape, gelu)
        return glu_forward(g2, u2, gelu)  # as rows: see rows_to

    @staticmethod
    @first_order_only
    def backward(ctx, dy):
        g2, u2 = ctx.saved_tensors
        shape, gelu = ctx.meta
        return (*_backward(dy, g2, u2, shape, gelu), None)


# The traced door: fastft::glu and its backward as custom ops (fastft.ops.compiled). The backward op takes gate
# and up as they came (a fused gate_up projection's halves stay views) and makes rows of them itself.
@torch.library.custom_op("fastft::glu", mutates_args=())
def glu_op(gate: torch.Tensor, up: torch.Tensor, gelu: bool) -> torch.Tensor:
    return _forward(gate, up, gelu)


@glu_op.register_fake
def _(gate, up, gelu):
    return gate.new_empty(gate.shape)


@torch.library.custom_op("fastft::glu_backward", mutates_args=())
def glu_backward_op(dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor,
                    gelu: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return _backward(dy, as_rows(gate), as_rows(up), gate.shape, gelu)


@glu_backward_op.register_fake
def _(dy, gate, up, gelu):
    return gate.new_empty(gate.shape), up.new_empty(up.shape)


def _setup_context(ctx, inputs, output):
    gate, up, gelu = inputs
    ctx.save_for_backward(gate, up)
    ctx.gelu = gelu


def _backward_op(ctx, dy):
    gate, up = ctx.saved_tensors
    return (*glu_backward_op(dy, gate, up, ctx.gelu), None)


glu_op.register_autograd(_backward_op, setup_context=_setup_context)


def _glu(op, gate, up, gelu, backend):
    check_tensor(op, "gate", gate, dim=1)
    check_tensor(op, "up", up, dim=1)
    check(gate.shape == up.shape,
          lambda: f"{op}: `gate` {tuple(gate.shape)} and `up` {tuple(up.shape)} must have one shape")
    check(gate.dtype == up.dtype, lambda: f"{op}: `gate` is {gate.dtype} but `up` is {up.dtype}")
    check(gate.device == up.device, lambda: f"{op}: `gate` is on {gate.device} but `up` is on {up.device}")
    if resolve_backend(op, backend, gate.device, arg="gate", dtype=gate.dtype) == "torch" or gate.numel() == 0:
        return (geglu_reference if gelu else swiglu_reference)(gate, up)
    with autocast_off(gate.device.type):
        if compiling():
            return glu_op(gate, up, gelu)
        return rows_to(GLUFunction.apply(gate, up, gelu), gate)


def swiglu(gate, up, *, backend="auto"):
    """silu(gate)·up, elementwise; gate and up share shape and dtype."""
    return _glu("swiglu", gate, up, False, backend)


def geglu(gate, up, *, backend="auto"):
    """gelu(gate, approximate="tanh")·up, elementwise; gate and up share shape and dtype."""
    return _glu("geglu", gate, up, True, backend)
