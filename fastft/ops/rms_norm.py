"""RMSNorm, optionally fused with the residual add before it: Llama's w·x̂ and Gemma's (1 + w)·x̂.

`rms_norm` validates once and dispatches: the Triton kernels (fastft.kernels.rms_norm) on CUDA, the pure-torch
`rms_norm_reference` elsewhere. Both round like transformers' own modules, so a patched model stays close to
an unpatched one:
- cast="input" (LlamaRMSNorm, Qwen, Mistral): x̂ computed in fp32, rounded to x's dtype, times w; the result
  has promote(x.dtype, w.dtype) as `w * x̂.to(dtype)` does;
- cast="fp32" (Gemma2/3RMSNorm): (offset + w)·x̂ in fp32, the result in x's dtype.
Under torch.autocast nothing changes: transformers' norms are not autocast ops either.
"""
from __future__ import annotations

from typing import Optional

import torch

from fastft.ops.compiled import compiling, needed, unused
from fastft.ops.shared import (as_rows, autocast_off, check, check_tensor, finite, first_order_only, resolve_backend,
                               rows_to, to_dtype)

CASTS = ("input", "fp32")


def rms_norm_reference(x, weight, eps, *, offset=0.0, residual=None, cast=None):
    """Plain torch, as transformers writes it: y, or (y, x + residual) when residual is given."""
    cast = cast or ("input" if offset == 0.0 else "fp32")
    h = x if residual is None else x + residual
    hf = h.float()
    xhat = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)
    if cast == "input":
        w = weight if offset == 0.0 else weight + offset
        y = w * xhat.to(h.dtype)
    else:
        y = (xhat * (offset + weight.float())).to(h.dtype)
    return y if residual is None else (y, h)


def _out_dtype(x_dtype, w_dtype, cast):
    return torch.promote_types(x_dtype, w_dtype) if cast == "input" else x_dtype


def _forward(x, weight, residual, eps, offset, cast):
    """(y, h, rstd): y and h as rows (see rows_to), h None without a residual, rstd per row."""
    from fastft.kernels import rms_norm as kernels

    r2 = as_rows(residual) if residual is not None else None
    y, h, rstd = kernels.rms_norm_forward(as_rows(x), weight, eps, offset, cast == "input",
                                          _out_dtype(x.dtype, weight.dtype, cast), r2)
    return y, h, rstd


def _backward(dy, dh, h, weight, rstd, offset, need_w):
    """(dx rows, dw in weight's dtype or None); dh: the gradient reaching the returned h, or None."""
    from fastft.kernels import rms_norm as kernels

    dx, dw = kernels.rms_norm_backward(as_rows(dy), h, weight, rstd, offset,
                                       as_rows(dh) if dh is not None else None, need_w)
    return dx, (to_dtype(dw, weight.dtype) if dw is not None else None)


def _saved_h(x, h, residual):
    """The normed input backward needs: h = x + residual when there is one, else x itself (as rows)."""
    return as_rows(h) if residual is not None else as_rows(x)


def _grads(needs, shape, has_residual, dx, dw):
    dx = dx.view(*shape)  # (unpacked: a view to a torch.Size argument costs ~1.5 µs more)
    return (dx if needs[0] else None), dw, (dx if has_residual and needs[2] else None), None, None, None


class RMSNormFunction(torch.autograd.Function):
    """The eager door (fastft.ops.compiled)."""

    @staticmethod
    def forward(ctx, x, weight, residual, eps, offset, cast):
        y, h, rstd = _forward(x, weight, residual, eps, offset, cast)
        ctx.save_for_backward(_saved_h(x, h, residual), weight, rstd)
        ctx.meta = (x.shape, offset, residual is not None)
        return y if residual is None else (y, h)  # as rows: see rows_to

    @staticmethod
    @first_order_only
    def backward(ctx, dy, dh=None):
        h, weight, rstd = ctx.saved_tensors
        shape, offset, has_residual = ctx.meta
        dx, dw = _backward(dy, dh if has_residual else None, h, weight, rstd, offset, ctx.needs_input_grad[1])
        return _grads(ctx.needs_input_grad, shape, has_residual, dx, dw)


# The traced door: fastft::rms_norm and its backward as custom ops (fastft.ops.compiled).
@torch.library.custom_op("fastft::rms_norm", mutates_args=())
def rms_norm_op(x: torch.Tensor, weight: torch.Tensor, residual: Optional[torch.Tensor], eps: float, offset: float,
                cast: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    y, h, rstd = _forward(x, weight, residual, eps, offset, cast)
    return rows_to(y, x), (rows_to(h, x) if h is not None else unused(x)), rstd


@rms_norm_op.register_fake
def _(x, weight, residual, eps, offset, cast):
    y = x.new_empty(x.shape, dtype=_out_dtype(x.dtype, weight.dtype, cast))
    h = x.new_empty(x.shape) if residual is not None else unused(x)
    return y, h, x.new_empty((x.numel() // x.shape[-1],), dtype=torch.float32)


@torch.library.custom_op("fastft::rms_norm_backward", mutates_args=())
def rms_norm_backward_op(dy: torch.Tensor, dh: Optional[torch.Tensor], h: torch.Tensor, weight: torch.Tensor,
                         rstd: torch.Tensor, offset: float, need_w: bool) -> tuple[torch.Tensor, torch.Tensor]:
    dx, dw = _backward(dy, dh, h, weight, rstd, offset, need_w)
    return dx, (dw if need_w else unused(weight))


@rms_norm_backward_op.register_fake
def _(dy, dh, h, weight, rstd, offset, need_w):
    return h.new_empty(h.shape), (weight.new_empty(weight.shape) if need_w else unused(weight))


def _setup_context(ctx, inputs, output):
    x, weight, residual, eps, offset, cast = inputs
    ctx.save_for_backward(_saved_h(x, output[1], residual), weight, output[2])
    ctx.meta = (x.shape, offset, residual is not None)


def _backward_op(ctx, dy, dh, _drstd):
    h, weight, rstd = ctx.saved_tensors
    shape, offset, has_residual = ctx.meta
    need_w = ctx.needs_input_grad[1]
    dx, dw = rms_norm_backward_op(dy, dh if has_residual else None, h, weight, rstd, offset, need_w)
    return _grads(ctx.needs_input_grad, shape, has_residual, dx, needed(dw, need_w))


rms_norm_op.register_autograd(_backward_op, setup_context=_setup_context)


def validate_rms_norm_args(x, weight, eps, offset, residual, cast) -> None:
    op = "rms_norm"
    check_tensor(op, "x", x, dim=1)
    check_tensor(op, "weight", weight)
    N = x.shape[-1]
    check(weight.dim() == 1 and weight.shape[0] == N,
          lambda: f"{op}: `weight` must have shape ({N},) to match x's last dimension, got {tuple(weight.shape)}")
    check(weight.device == x.device, lambda: f"{op}: `weight` is on {weight.device} but `x` is on {x.device}")
    # finite and not a bool: eps=inf gives zeros, offset=nan NaN, True is a slip (both backends would take them);
    # 0 as transformers takes it (a config with rms_norm_eps=0: an all-zero row is then NaN there and here alike)
    check(isinstance(eps, (int, float)) and not isinstance(eps, bool) and eps >= 0 and finite(eps),
          lambda: f"{op}: `eps` must be a non-negative number (finite, not a bool), got {eps!r}")
    check(isinstance(offset, (int, float)) and not isinstance(offset, bool) and finite(offset),
          lambda: f"{op}: `offset` must be a finite number (0 for Llama, 1 for Gemma; not a bool), got {offset!r}")
    check(cast in CASTS, lambda: f"{op}: `cast` must be one of {CASTS} or None, got {cast!r}")
    if residual is not None:
        check_tensor(op, "residual", residual)
        check(residual.shape == x.shape,
              lambda: f"{op}: `residual` must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")
        check(residual.dtype == x.dtype, lambda: f"{op}: `residual` is {residual.dtype} but `x` is {x.dtype}")
        check(residual.device == x.device, lambda: f"{op}: `residual` is on {residual.device} but `x` is on {x.device}")


def rms_norm(x, weight, eps=1e-6, *, offset=0.0, residual=None, cast=None, backend="auto"):
    """y = (offset + w)·x̂ over the last dimension; with `residual`, h = x + residual is normed and (y, h) returned
    (the pre-norm pattern: h feeds the next residual add).

    cast: "input" (Llama rounding, default when offset == 0) or "fp32" (Gemma rounding, default otherwise).
    backend: "auto" (Triton on CUDA, torch elsewhere), "triton" or "torch".
    """
    cast = cast if cast is not None else ("input" if offset == 0.0 else "fp32")
    validate_rms_norm_args(x, weight, eps, offset, residual, cast)
    backend = resolve_backend("rms_norm", backend, x.device, arg="x", dtype=x.dtype)
    if backend == "torch" or x.numel() == 0:
        return rms_norm_reference(x, weight, eps, offset=offset, residual=residual, cast=cast)
    with autocast_off(x.device.type):
        if not compiling():
            out = RMSNormFunction.apply(x, weight, residual, float(eps), float(offset), cast)
            return rows_to(out, x) if residual is None else (rows_to(out[0], x), rows_to(out[1], x))
        y, h, _ = rms_norm_op(x, weight, residual, float(eps), float(offset), cast)
        return y if residual is None else (y, h)
