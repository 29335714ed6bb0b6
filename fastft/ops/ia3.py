"""The fused IA3 linear op (peft's IA3, tuners/ia3/layer.py), the learned vector l folded into the GEMM:

    output scale (attention k/v):   y = (x·Wᵀ + b) ⊙ l          l ∈ ℝᴺ — an epilogue column scale
    input scale (feed-forward):     y = (x ⊙ l)·Wᵀ + b          l ∈ ℝᴷ — a prologue scale on x's K-columns

Both are fastft.kernels.lora_gemm's GEMM without a rank tail, with its column-scale epilogue or its K-scale
on the A-operand loads; no separate elementwise pass over x or y. Backward:
    output scale: dx = (dy ⊙ l)·W  (K-scale on dy's loads),  dl = Σ_tokens dy ⊙ y / l
    input scale:  dx = (dy·W) ⊙ l  (column-scale epilogue),  dl = Σ_tokens x ⊙ dx / l
with the Σ_tokens a split-M column reduction (fastft.kernels.column_dot). A vector entry exactly 0 gets
gradient 0 on the fused path (its column carries nothing to divide); peft initialises l = 1. fp16 runs the torch
path: there y (or dx) of an entry |l| ≲ 1e-4 is subnormal, and dividing its few digits by l gave dl 3% off at
|l| = 1e-6 and 2× at 3e-8 (bf16 and fp32 keep full precision down to |l| ~ 1e-38).
CPU and backend="torch": `ia3_linear_reference`, the same math in torch.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from fastft.ops.compiled import compiling, needed, unused
from fastft.ops.shared import (as_rows, autocast_inputs, autocast_off, check, check_backend, check_tensor,
                               first_order_only, resolve_backend, rows_to, safe_div, to_dtype)


def ia3_linear_reference(x, weight, bias, ia3_l, feedforward: bool):
    """peft's IA3 Linear forward in torch (autograd through torch)."""
    if bias is not None and bias.dtype != x.dtype:  # the fused kernels take any float bias (added in fp32)
        bias = bias.to(x.dtype)
    if feedforward:
        return F.linear((x * ia3_l.flatten()).to(x.dtype), weight, bias)
    y = F.linear(x, weight, bias)
    return (y * ia3_l.flatten()).to(y.dtype)


def _scale(ia3_l: torch.Tensor) -> torch.Tensor:
    return ia3_l.detach().reshape(-1).float().contiguous()


def _forward(x2, weight, bias, scale, feedforward):
    """y as rows (M, N)."""
    from fastft.kernels.lora_gemm import lora_gemm

    if feedforward:
        return lora_gemm(x2, weight, None, None, bias, b_nk=True, k_scale=scale)
    scaled_bias = None if bias is None else (bias.float() * scale).contiguous()
    return lora_gemm(x2, weight, None, None, scaled_bias, b_nk=True, col_scale=scale)


def _backward(dy, saved, weight, scale, bias, feedforward, need_x, need_b, need_l, x_shape, l_shape, l_dtype):
    """(dx, db, dl), None where not needed; saved: x as rows (feedforward) or y as rows (output scale)."""
    from fastft.kernels.lora_gemm import lora_gemm
    from fastft.kernels.column_dot import column_dot

    N = weight.shape[0]
    dy2 = to_dtype(dy.reshape(-1, N), weight.dtype)
    if not dy2.is_contiguous():
        dy2 = dy2.contiguous()
    dx = db = dl = None
    if feedforward:
        if need_x or need_l:
            dx = lora_gemm(dy2, weight, None, None, None, b_nk=False, col_scale=scale)
            if need_l:
                dl = to_dtype(safe_div(column_dot(saved, dx), scale).reshape(l_shape), l_dtype)
            dx = dx.view(*x_shape) if need_x else None
        if need_b and bias is not None:
            db = dy2.sum(0, dtype=torch.float32).to(bias.dtype)
    else:
        if need_x:
            dx = lora_gemm(dy2, weight, None, None, None, b_nk=False, k_scale=scale).view(*x_shape)
        if need_l:
            dl = to_dtype(safe_div(column_dot(dy2, saved), scale).reshape(l_shape), l_dtype)
        if need_b and bias is not None:
            db = (dy2.sum(0, dtype=torch.float32) * scale).to(bias.dtype)
    return dx, db, dl


class IA3LinearFunction(torch.autograd.Function):
    """The eager door (fastft.ops.compiled)."""

    @staticmethod
    def forward(ctx, x, weight, bias, ia3_l, feedforward):
        x2 = as_rows(x)
        scale = _scale(ia3_l)
        y = _forward(x2, weight, bias, scale, feedforward)
        # W only where backward reads it (dx; feed-forward's dl comes from dx): under autocast it is a cast copy
        need_w = ctx.needs_input_grad[0] or (feedforward and ctx.needs_input_grad[3])
        ctx.save_for_backward(x2 if feedforward else None, y if not feedforward else None,
                              weight if need_w else None, scale, bias)
        ctx.meta = (x.shape, feedforward, ia3_l.shape, ia3_l.dtype, weight.shape, weight.dtype)
        return y  # as rows: see rows_to

    @staticmethod
    @first_order_only
    def backward(ctx, dy):
        x2, y, weight, scale, bias = ctx.saved_tensors
        x_shape, feedforward, l_shape, l_dtype, w_shape, w_dtype = ctx.meta
        if weight is None:  # not needed (not kept): its shape and dtype stand in
            weight = torch.empty(w_shape, dtype=w_dtype, device="meta")
        need_x, _, need_b, need_l = ctx.needs_input_grad[:4]
        dx, db, dl = _backward(dy, x2 if feedforward else y, weight, scale, bias, feedforward, need_x, need_b,
                               need_l, x_shape, l_shape, l_dtype)
        return dx, None, db, dl, None


# The traced door: fastft::ia3_linear and its backward as custom ops (fastft.ops.compiled). The backward op gets
# x (feedforward) or the output y, and re-derives the fp32 scale from ia3_l.
@torch.library.custom_op("fastft::ia3_linear", mutates_args=())
def ia3_linear_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], ia3_l: torch.Tensor,
                  feedforward: bool) -> torch.Tensor:
    return rows_to(_forward(as_rows(x), weight, bias, _scale(ia3_l), feedforward), x)


@ia3_linear_op.register_fake
def _(x, weight, bias, ia3_l, feedforward):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.custom_op("fastft::ia3_linear_backward", mutates_args=())
def ia3_linear_backward_op(dy: torch.Tensor, saved: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                           ia3_l: torch.Tensor, feedforward: bool, need_x: bool, need_b: bool,
                           need_l: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    rows = as_rows(saved) if feedforward else saved.reshape(-1, weight.shape[0])
    x_shape = (*dy.shape[:-1], weight.shape[1])
    dx, db, dl = _backward(dy, rows, weight, _scale(ia3_l), bias, feedforward, need_x, need_b, need_l, x_shape,
                           ia3_l.shape, ia3_l.dtype)
    return (dx if dx is not None else unused(weight), db if db is not None else unused(weight),
            dl if dl is not None else unused(weight))


@ia3_linear_backward_op.register_fake
def _(dy, saved, weight, bias, ia3_l, feedforward, need_x, need_b, need_l):
    dx = weight.new_empty((*dy.shape[:-1], weight.shape[1])) if need_x else unused(weight)
    db = bias.new_empty(bias.shape) if need_b and bias is not None else unused(weight)
    return dx, db, (ia3_l.new_empty(ia3_l.shape) if need_l else unused(weight))


def _setup_context(ctx, inputs, output):
    x, weight, bias, ia3_l, feedforward = inputs
    ctx.save_for_backward(x if feedforward else output, weight, bias, ia3_l)
    ctx.feedforward = feedforward


def _backward_op(ctx, dy):
    saved, weight, bias, ia3_l = ctx.saved_tensors
    need_x, _, need_b, need_l = ctx.needs_input_grad[:4]
    need_b = need_b and bias is not None
    dx, db, dl = ia3_linear_backward_op(dy, saved, weight, bias, ia3_l, ctx.feedforward, need_x, need_b, need_l)
    return needed(dx, need_x), None, needed(db, need_b), needed(dl, need_l), None


ia3_linear_op.register_autograd(_backward_op, setup_context=_setup_context)


def ia3_linear(x, weight, bias, ia3_l, *, feedforward: bool, backend="auto"):
    """peft's IA3 linear: feedforward → y = (x⊙l)·Wᵀ + b with l of shape (1, K); else y = (x·Wᵀ + b)⊙l with l of
    shape (N, 1) (peft's parameter shapes; any shape with K or N elements is accepted). W frozen (a W that
    requires grad gets it, on the torch path). fp16 x runs the torch path (the module docstring says why).
    backend: "auto" (Triton on CUDA, torch elsewhere), "triton" or "torch"."""
    check_backend("ia3_linear", backend)
    if not isinstance(feedforward, bool):  # a string "False" would be taken as True
        raise TypeError(f"ia3_linear: `feedforward` must be True or False, got {feedforward!r}")
    x, weight = autocast_inputs(x, weight)
    check_tensor("ia3_linear", "x", x, dim=1)
    check_tensor("ia3_linear", "weight", weight)
    check_tensor("ia3_linear", "ia3_l", ia3_l)
    if weight.dim() != 2 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"ia3_linear: `x` (shape {tuple(x.shape)}) and `weight` (shape {tuple(weight.shape)}) do "
                         "not match: expected x (..., K) and weight (N, K)")
    N, K = weight.shape
    want = K if feedforward else N
    if ia3_l.numel() != want:
        raise ValueError(f"ia3_linear: `ia3_l` must have {want} elements ({'in' if feedforward else 'out'}_features "
                         f"for feedforward={feedforward}), got shape {tuple(ia3_l.shape)}")
    if x.dtype != weight.dtype:
        raise ValueError(f"ia3_linear: `x` is {x.dtype} but `weight` is {weight.dtype}; cast one of them or run "
                         "under torch.autocast")
    if bias is not None:  # any float dtype (the reference casts it to x's, the kernels add it in fp32)
        check(isinstance(bias, torch.Tensor) and bias.is_floating_point() and tuple(bias.shape) == (N,),
              lambda: f"ia3_linear: `bias` must be None or a floating-point tensor of shape ({N},), got "
                      + (f"{bias.dtype} of shape {tuple(bias.shape)}" if isinstance(bias, torch.Tensor)
                         else type(bias).__name__))
    device = x.device
    if not (weight.device == device and ia3_l.device == device and (bias is None or bias.device == device)):
        devices = {t.device for t in (x, weight, ia3_l, bias) if t is not None}
        raise ValueError(f"ia3_linear: all tensors must be on one device, got {sorted(map(str, devices))}")
    backend = resolve_backend("ia3_linear", backend, x.device, arg="x", dtype=x.dtype)
    # the fused path gives W no gradient: a trainable W (a partly unfrozen base) takes the torch path; so does fp16
    # (dl from subnormal values: the module docstring); an empty y (no tokens, or out_features 0): nothing to do
    if backend == "torch" or x.numel() == 0 or N == 0 or x.dtype == torch.float16 \
            or (weight.requires_grad and torch.is_grad_enabled()):
        return ia3_linear_reference(x, weight, bias, ia3_l, feedforward)
    with autocast_off(x.device.type):
        if compiling():
            return ia3_linear_op(x, weight, bias, ia3_l, bool(feedforward))
        return rows_to(IA3LinearFunction.apply(x, weight, bias, ia3_l, bool(feedforward)), x)
