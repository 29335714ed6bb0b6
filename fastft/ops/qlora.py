"""Linear layers over an NF4 weight: the QLoRA linear and the plain NF4 linear.

qlora_linear  y = x·Wᵀ + b + s·(dropout(x)·Aᵀ)·Bᵀ    W an NF4Weight (frozen), A (r×K), B (N×r) trained
nf4_linear    y = x·Wᵀ + b                          W an NF4Weight (frozen)

Both validate once and dispatch: on CUDA qlora_linear composes the rank-R kernels (fastft.kernels.rank_ops) with
the base GEMM fastft.ops.qlora_path selects per shape by measurement (the Triton GEMM that dequantizes W tile by
tile inside its loads, fastft.kernels.nf4_gemm, or W dequantized into one shared scratch buffer + the dense LoRA
GEMM, fastft.kernels.lora_gemm);
nf4_linear the same selected GEMM without the rank tail, or for 1–16 tokens the CUDA decode GEMV
(fastft.kernels.nf4_cuda); everywhere else the pure-torch references below (dequantize, then the dense op).
Weights whose rows do not hold whole blocks (in_features odd or not a multiple of the blocksize) take a
dequantize-then-dense path on CUDA too. No weight gradient: W is frozen.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from fastft.ops.compiled import compiling, needed, unused
from fastft.ops.compiled_args import (fresh_like, nf4_args, nf4_from_args, refuse_replayed_dropout, seed_int,
                                      seeded_ops, traced_seed)
from fastft.ops.nf4_matmul import bias_as, nf4_matmul_torch
from fastft.ops.qlora_path import nf4_base_gemm, release_dequant_scratch  # noqa: F401 - the latter public here too
from fastft.ops.lora import (add_rank_path, backward_operands, fused_lora_backward, fused_lora_forward,
                             lora_linear_reference, lora_meta, saved_factors)
from fastft.ops.shared import (as_rows, autocast_inputs, autocast_off, check, finite, nf4_fused_ok,
                               first_order_only, resolve_backend, rows_to)
from fastft.quant.nf4_weight import NF4Weight



def qlora_linear_reference(x, qweight, bias, lora_A, lora_B, scaling, dropout_p=0.0, *, keep_mask=None):
    """Dequantize W to x's dtype, then lora_linear_reference (autograd through torch)."""
    return lora_linear_reference(x, qweight.dequantize(x.dtype), bias_as(bias, x), lora_A, lora_B, scaling,
                                 dropout_p, keep_mask=keep_mask)


def nf4_linear_reference(x, qweight, bias):
    return F.linear(x, qweight.dequantize(x.dtype), bias_as(bias, x))


def _validate_base(op: str, x, qweight, bias) -> None:
    check(isinstance(qweight, NF4Weight),
          lambda: f"{op}: `qweight` must be a fastft.quant.NF4Weight (from quantize_nf4), got {type(qweight).__name__}")
    check(qweight.ndim == 2, lambda: f"{op}: `qweight` must be 2-D (out_features, in_features), got shape "
                                     f"{tuple(qweight.shape)}")
    check(isinstance(x, torch.Tensor), lambda: f"{op}: `x` must be a torch.Tensor, got {type(x).__name__}")
    check(x.dtype in (torch.float32, torch.float16, torch.bfloat16),
          lambda: f"{op}: `x` must be float32, float16 or bfloat16, got {x.dtype}")
    check(x.dim() >= 1, lambda: f"{op}: `x` needs at least one dimension (..., in_features)")
    N, K = qweight.shape
    check(x.shape[-1] == K, lambda: f"{op}: `x` has {x.shape[-1]} features in its last dimension but `qweight` expects "
                                    f"{K} (qweight shape {tuple(qweight.shape)})")
    check(x.device == qweight.device, lambda: f"{op}: `x` is on {x.device} but `qweight` is on {qweight.device}; "
                                              "move the weight with qweight.to(device)")
    if bias is not None:
        check(isinstance(bias, torch.Tensor) and bias.is_floating_point(),
              lambda: f"{op}: `bias` must be a floating-point tensor or None")
        check(tuple(bias.shape) == (N,), lambda: f"{op}: `bias` must have shape ({N},), got {tuple(bias.shape)}")
        check(bias.device == x.device, lambda: f"{op}: `bias` is on {bias.device} but `x` is on {x.device}")


def validate_qlora_linear_args(x, qweight, bias, lora_A, lora_B, scaling, dropout_p) -> None:
    op = "qlora_linear"
    _validate_base(op, x, qweight, bias)
    N, K = qweight.shape
    for name, t in (("lora_A", lora_A), ("lora_B", lora_B)):
        check(isinstance(t, torch.Tensor) and t.is_floating_point(),
              lambda: f"{op}: `{name}` must be a floating-point tensor, got {type(t).__name__}")
        check(t.device == x.device, lambda: f"{op}: `{name}` is on {t.device} but `x` is on {x.device}")
    check(lora_A.dim() == 2 and lora_A.shape[1] == K and lora_A.shape[0] >= 1,
          lambda: f"{op}: `lora_A` must have shape (r, {K}), got {tuple(lora_A.shape)}")
    r = lora_A.shape[0]
    check(tuple(lora_B.shape) == (N, r), lambda: f"{op}: `lora_B` must have shape ({N}, {r}) to match `qweight` and "
                                                 f"`lora_A`, got {tuple(lora_B.shape)}")
    # messages built only on failure: dynamo cannot format a float while it traces with dynamic=True
    if not (isinstance(scaling, (int, float)) and not isinstance(scaling, bool) and finite(scaling)):
        raise ValueError(f"{op}: `scaling` must be a finite number (not a bool), got {scaling!r}")
    if not (isinstance(dropout_p, (int, float)) and 0.0 <= dropout_p < 1.0):
        raise ValueError(f"{op}: `dropout_p` must be in [0, 1), got {dropout_p!r}")


def qlora_forward(x, qweight, bias, lora_A, lora_B, scaling, dropout_p, seed=None):
    """Both doors' forward (fastft.ops.compiled): (y, saved, meta) as fused_lora_forward."""
    return fused_lora_forward(x, bias, lora_A, lora_B, scaling, dropout_p,
                              lambda x2, xs, B_p, b: nf4_base_gemm(qweight, x2, xs, B_p, b, forward=True), seed=seed)


def qlora_backward(saved, meta, qweight, dy, need_x, need_b, need_A, need_B):
    """Both doors' backward: (dx, db, dA, dB), None where not needed."""
    _, _, dx, db, dA, dB = fused_lora_backward(
        saved, meta, dy, lambda dy2, g, A_p, p, seed, room: nf4_base_gemm(qweight, dy2, g, A_p, None, forward=False,
                                                                          p_drop=p, seed=seed, leave_room=room),
        need_x, need_b, need_A, need_B)
    return dx, db, dA, dB


class QLoRALinearFunction(torch.autograd.Function):
    """lora_linear's fused forward/backward with an NF4 base GEMM (no weight gradient): per shape the in-register
    NF4 GEMM or the shared-scratch dequantize + dense LoRA GEMM, whichever measured faster (fastft.ops.qlora_path).
    The eager door (fastft.ops.compiled)."""

    @staticmethod
    def forward(ctx, x, qweight, bias, lora_A, lora_B, scaling, dropout_p):
        refuse_replayed_dropout("qlora_linear", dropout_p, x.device)  # the seed is drawn on the host below
        ctx.qweight = qweight
        y, saved, ctx.meta = qlora_forward(x, qweight, bias, lora_A, lora_B, scaling, dropout_p)
        ctx.save_for_backward(*saved_factors(saved, lora_A, lora_B))  # A_p/B_p rebuilt in backward
        return y

    @staticmethod
    @first_order_only
    def backward(ctx, dy):
        need_x, _, need_b, need_A, need_B = ctx.needs_input_grad[:5]
        saved = backward_operands(*ctx.saved_tensors)
        dx, db, dA, dB = qlora_backward(saved, ctx.meta, ctx.qweight, dy, need_x, need_b, need_A, need_B)
        return dx, None, db, dA, dB, None, None


def nf4_forward(x, qweight, bias):
    """Both doors' forward of nf4_linear: y as rows (M, N) (see rows_to)."""
    from fastft.kernels import nf4_cuda

    x2 = as_rows(x)
    w = qweight.kernel_operand()
    if nf4_cuda.supported(x2, w):  # decode: 1–16 tokens
        y = nf4_cuda.nf4_gemv(x2, w, bias)
    else:
        y = nf4_base_gemm(qweight, x2, None, None, bias, forward=True)
    return y


def nf4_backward(qweight, dy, x_shape, bias_dtype, need_x, need_b):
    """Both doors' backward of nf4_linear: (dx, db), None where not needed."""
    N = qweight.shape[0]
    dy2 = dy.reshape(-1, N).contiguous()
    dx = db = None
    if need_x:
        dx = nf4_base_gemm(qweight, dy2, None, None, None, forward=False).view(x_shape)
    if need_b and bias_dtype is not None:
        db = dy2.sum(0, dtype=torch.float32).to(bias_dtype)
    return dx, db


class NF4LinearFunction(torch.autograd.Function):
    """The eager door (fastft.ops.compiled)."""

    @staticmethod
    def forward(ctx, x, qweight, bias):
        ctx.qweight = qweight
        ctx.meta = (x.shape, None if bias is None else bias.dtype)
        return nf4_forward(x, qweight, bias)

    @staticmethod
    @first_order_only
    def backward(ctx, dy):
        dx, db = nf4_backward(ctx.qweight, dy, *ctx.meta, ctx.needs_input_grad[0], ctx.needs_input_grad[2])
        return dx, None, db


# The traced doors: fastft::qlora_linear, fastft::nf4_linear and their backwards as custom ops
# (fastft.ops.compiled). The NF4Weight crosses as its inner tensors and fields (compiled_args.nf4_args); the
# rank-padded factors are padded again in backward from the inputs; the dropout seed comes from fastft::draw_seed
# (fastft.ops.compiled_args) as for lora_linear.
def _qlora_linear_body(x: torch.Tensor, w_parts: list[torch.Tensor], w_ints: list[int], bias: Optional[torch.Tensor],
                       lora_A: torch.Tensor, lora_B: torch.Tensor, seed: Optional[torch.Tensor], scaling: float,
                       dropout_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    seed = seed_int("qlora_linear", seed, dropout_p, x.device)
    y, saved, _ = qlora_forward(x, nf4_from_args(w_parts, w_ints), bias, lora_A, lora_B, scaling, dropout_p, seed)
    return rows_to(y, x), saved[3]


def _qlora_linear_fake(x, w_parts, w_ints, bias, lora_A, lora_B, seed, scaling, dropout_p):
    from fastft.kernels.rank_ops import rank_pad

    M = x.numel() // x.shape[-1]
    return x.new_empty((*x.shape[:-1], w_ints[0])), x.new_empty((M, rank_pad(lora_A.shape[0])))


def _qlora_linear_backward_body(dy: torch.Tensor, x: torch.Tensor, w_parts: list[torch.Tensor], w_ints: list[int],
                                bias: Optional[torch.Tensor], lora_A: torch.Tensor, lora_B: torch.Tensor,
                                xs: torch.Tensor, seed: Optional[torch.Tensor], scaling: float, dropout_p: float,
                                need_x: bool, need_b: bool, need_A: bool, need_B: bool
                                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    saved = backward_operands(x, lora_A, lora_B, xs)
    meta = lora_meta(x, bias, lora_A, lora_B, scaling, dropout_p, seed_int("qlora_linear", seed, dropout_p, x.device))
    grads = qlora_backward(saved, meta, nf4_from_args(w_parts, w_ints), dy, need_x, need_b, need_A, need_B)
    return tuple(g if g is not None else unused(like) for g, like in zip(grads, (x, dy, lora_A, lora_B)))


def _qlora_linear_backward_fake(dy, x, w_parts, w_ints, bias, lora_A, lora_B, xs, seed, scaling, dropout_p, need_x,
                                need_b, need_A, need_B):
    dB = lora_B.new_empty(lora_B.shape) if need_B else unused(lora_B)
    db = bias.new_empty(bias.shape) if need_b and bias is not None else unused(dy)
    return fresh_like(x, need_x), db, fresh_like(lora_A, need_A), dB


# fastft::qlora_linear_backward(_dropout): compiled_args.seeded_ops
QLORA_LINEAR_BACKWARD_OPS = seeded_ops("qlora_linear_backward", _qlora_linear_backward_body,
                                       _qlora_linear_backward_fake)


def _qlora_setup_context(ctx, inputs, output):
    x, w_parts, w_ints, bias, lora_A, lora_B, seed, scaling, dropout_p = inputs
    ctx.save_for_backward(x, bias, lora_A, lora_B, output[1], seed, *w_parts)
    ctx.meta = (w_ints, scaling, dropout_p)


def _qlora_backward_op(ctx, dy, _dxs):
    x, bias, lora_A, lora_B, xs, seed, *w_parts = ctx.saved_tensors
    w_ints, scaling, dropout_p = ctx.meta
    need = ctx.needs_input_grad
    needs = (need[0], need[3] and bias is not None, need[4], need[5])
    dx, db, dA, dB = QLORA_LINEAR_BACKWARD_OPS[dropout_p > 0.0](dy, x, w_parts, w_ints, bias, lora_A, lora_B, xs,
                                                                 seed, scaling, dropout_p, *needs)
    dx, db, dA, dB = (needed(g, n) for g, n in zip((dx, db, dA, dB), needs))
    return dx, [None] * len(w_parts), None, db, dA, dB, None, None, None


# fastft::qlora_linear and fastft::qlora_linear_dropout
QLORA_LINEAR_OPS = seeded_ops("qlora_linear", _qlora_linear_body, _qlora_linear_fake, _qlora_backward_op,
                              _qlora_setup_context)
qlora_linear_op, qlora_linear_backward_op = QLORA_LINEAR_OPS[False], QLORA_LINEAR_BACKWARD_OPS[False]


@torch.library.custom_op("fastft::nf4_linear", mutates_args=())
def nf4_linear_op(x: torch.Tensor, w_parts: list[torch.Tensor], w_ints: list[int],
                  bias: Optional[torch.Tensor]) -> torch.Tensor:
    return rows_to(nf4_forward(x, nf4_from_args(w_parts, w_ints), bias), x)


@nf4_linear_op.register_fake
def _(x, w_parts, w_ints, bias):
    return x.new_empty((*x.shape[:-1], w_ints[0]))


@torch.library.custom_op("fastft::nf4_linear_backward", mutates_args=())
def nf4_linear_backward_op(dy: torch.Tensor, w_parts: list[torch.Tensor], w_ints: list[int],
                           bias: Optional[torch.Tensor], need_x: bool, need_b: bool
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    x_shape = (*dy.shape[:-1], w_ints[1])
    dx, db = nf4_backward(nf4_from_args(w_parts, w_ints), dy, x_shape, None if bias is None else bias.dtype,
                          need_x, need_b)
    return (dx if dx is not None else unused(dy)), (db if db is not None else unused(dy))


@nf4_linear_backward_op.register_fake
def _(dy, w_parts, w_ints, bias, need_x, need_b):
    dx = dy.new_empty((*dy.shape[:-1], w_ints[1])) if need_x else unused(dy)
    return dx, (bias.new_empty(bias.shape) if need_b and bias is not None else unused(dy))


def _nf4_setup_context(ctx, inputs, output):
    x, w_parts, w_ints, bias = inputs
    ctx.save_for_backward(bias, *w_parts)
    ctx.meta = w_ints


def _nf4_backward_op(ctx, dy):
    bias, *w_parts = ctx.saved_tensors
    need_x, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[3] and bias is not None
    dx, db = nf4_linear_backward_op(dy, w_parts, ctx.meta, bias, need_x, need_b)
    return needed(dx, need_x), [None] * len(w_parts), None, needed(db, need_b)


nf4_linear_op.register_autograd(_nf4_backward_op, setup_context=_nf4_setup_context)


def qlora_linear(x, qweight, bias, lora_A, lora_B, scaling, dropout_p=0.0, *, backend="auto"):
    """y = x·Wᵀ + b + s·(dropout(x)·Aᵀ)·Bᵀ with W an NF4Weight (N×K, frozen), A (r×K), B (N×r).

    x: (..., K) in fp16/bf16/fp32 (or under torch.autocast). On the Triton backend W is dequantized to x's dtype
    either inside the GEMM's tile loads or into one scratch buffer shared by all layers, whichever measured faster
    for the shape (fastft.ops.qlora_path; FASTFT_QLORA_PATH=fused|dequant|auto). Peak memory on the dequant path:
    at most the bf16 LoRA layer's plus one scratch buffer (the largest weight), freed by
    release_dequant_scratch(). lora_A/lora_B may be kept in another float dtype (fp32 masters): their gradients
    come back in it. dropout_p applies inverted dropout to the LoRA input only (pass 0 in eval). Gradients: x, bias, A, B.
    backend: "auto" (Triton on CUDA, torch elsewhere), "triton" or "torch".
    """
    (x,) = autocast_inputs(x)
    validate_qlora_linear_args(x, qweight, bias, lora_A, lora_B, scaling, dropout_p)
    scaling, dropout_p = float(scaling), float(dropout_p)
    backend = resolve_backend("qlora_linear", backend, x.device, arg="x")
    if backend == "torch" or x.numel() == 0:
        return add_rank_path(x, nf4_matmul_torch(x, qweight, bias), lora_A, lora_B, scaling, dropout_p)
    with autocast_off(x.device.type):
        if not compiling():
            return rows_to(QLoRALinearFunction.apply(x, qweight, bias, lora_A, lora_B, scaling, dropout_p), x)
        seed = traced_seed(x, lora_A, dropout_p)
        return QLORA_LINEAR_OPS[dropout_p > 0.0](x, *nf4_args(qweight), bias, lora_A, lora_B, seed, scaling,
                                                 dropout_p)[0]


def nf4_linear(x, qweight, bias=None, *, backend="auto"):
    """y = x·Wᵀ + b with W an NF4Weight (N×K, frozen); gradients for x and bias. See qlora_linear."""
    (x,) = autocast_inputs(x)
    _validate_base("nf4_linear", x, qweight, bias)
    backend = resolve_backend("nf4_linear", backend, x.device, arg="x")
    if backend == "torch" or x.numel() == 0 or not nf4_fused_ok(qweight):
        return nf4_matmul_torch(x, qweight, bias)
    with autocast_off(x.device.type):
        if not compiling():
            return rows_to(NF4LinearFunction.apply(x, qweight, bias), x)
        return nf4_linear_op(x, *nf4_args(qweight), bias)
