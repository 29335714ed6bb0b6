"""Gated linear units: SwiGLU silu(gate)·up (Llama, Qwen, Mistral) and GeGLU gelu_tanh(gate)·up (Gemma).

`swiglu` / `geglu` validate once and dispatch: Triton (fastft.kernels.glu) on CUDA, the torch references
elsewhere. The backward recomputes the activation from the saved gate and up, so only the two inputs stay
alive. Under torch.autocast nothing changes dtype: silu, gelu and mul are not autocast ops in torch either.
"""
from __future__ import annotations

import contextlib
import weakref

import torch
import torch.nn.functional as F

from fastft.kernels.runtime import under_func_transform
from fastft.ops.compiled import compiling
from fastft.ops.shared import (as_rows, autocast_off, check, check_tensor, first_order_only, resolve_backend, rows_to,
                               shared_cast_of)


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


RECOMPUTE_OUTPUT = True  # tests switch it off to compare


def recomputed_in_backward(out: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, gelu: bool, backend="auto"):
    """A block inside which `out` (this op's output: a gated MLP's down-projection input, which the projection's
    backward needs for its weights' or adapters' gradients) is not kept for backward but made again from gate and
    up (the same op: the same bits) when backward asks for it. gate and up stay alive anyway (the GLU's own
    backward reads them), so one activation of the intermediate width per token and layer is saved: ~20% of a
    Llama layer's activations (Unsloth's LoRA MLP recomputes it too). A no-op where it would not save memory or
    could not be used: under torch.compile (its partitioner chooses what to recompute), when other saved-tensor
    hooks run (activation checkpointing, save_on_cpu: ours would keep gate and up alive beside theirs), when gate
    or up needs no gradient (nothing else keeps it), under torch.func transforms, or without grad mode."""
    if compiling() or not (RECOMPUTE_OUTPUT and torch.is_grad_enabled() and gate.requires_grad and up.requires_grad
                           and type(out) is torch.Tensor and not under_func_transform() and _no_saved_tensor_hooks()
                           and out.numel() > 0 and out.is_contiguous() and out.storage_offset() == 0
                           and out.untyped_storage().nbytes() == out.numel() * out.element_size()):
        return contextlib.nullcontext()
    return torch.autograd.graph.saved_tensors_hooks(*_recipe_hooks(out, gate, up, gelu, backend))


def _no_saved_tensor_hooks() -> bool:
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return top is not None and top(False) is None


class _Recipe:
    """What a saved view of a GLU output (or of its cast) becomes: its geometry and dtype (the output is made again
    in backward)."""
    __slots__ = ("size", "stride", "offset", "dtype")

    def __init__(self, t: torch.Tensor):
        self.size, self.stride, self.offset, self.dtype = t.size(), t.stride(), t.storage_offset(), t.dtype


def _recipe_hooks(out, gate, up, gelu, backend):
    # nothing here may hold `out` itself: the hooks live as long as what they saved
    storage, dtype, device, out_ref = out.untyped_storage().data_ptr(), out.dtype, out.device, weakref.ref(out)
    versions = (gate._version, up._version)
    op = geglu if gelu else swiglu

    def pack(t):
        if t.device != device:
            return t
        if t.dtype == dtype and t.untyped_storage().data_ptr() == storage:
            return _Recipe(t)
        # an NF4 projection fed an fp32 output (after prepare_model_for_kbit_training) saves its bf16 cast
        source = out_ref()
        cast = shared_cast_of(source) if source is not None else None
        if cast is not None and t.dtype == cast.dtype and (t.untyped_storage().data_ptr()
                                                           == cast.untyped_storage().data_ptr()):
            return _Recipe(t)
        return t

    def unpack(saved):
        if not isinstance(saved, _Recipe):
            return saved
        if (gate._version, up._version) != versions:  # as autograd refuses a saved tensor changed in place
            raise RuntimeError("a gated MLP's gate or up projection output was modified in place after the "
                               "forward: its activation, which backward makes again from them, would differ")
        again = op(gate, up, backend=backend).contiguous()  # grad mode as backward runs it (create_graph keeps it)
        return again.to(saved.dtype).as_strided(saved.size, saved.stride, saved.offset)

    return pack, unpack
