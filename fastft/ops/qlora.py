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

import math

import torch
import torch.nn.functional as F

from fastft.ops import qlora_path
from fastft.ops.qlora_path import release_dequant_scratch  # noqa: F401 - public here too
from fastft.ops.lora import fused_lora_backward, fused_lora_forward, lora_linear_reference
from fastft.ops.shared import as_rows, autocast_inputs, check, nf4_fused_ok, resolve_backend
from fastft.quant.nf4_weight import NF4Weight



def qlora_linear_reference(x, qweight, bias, lora_A, lora_B, scaling, dropout_p=0.0, *, keep_mask=None):
    """Dequantize W to x's dtype, then lora_linear_reference (autograd through torch)."""
    return lora_linear_reference(x, qweight.dequantize(x.dtype), _bias_as(bias, x), lora_A, lora_B, scaling,
                                 dropout_p, keep_mask=keep_mask)


def nf4_linear_reference(x, qweight, bias):
    return F.linear(x, qweight.dequantize(x.dtype), _bias_as(bias, x))


def _bias_as(bias, x):
    # The fused kernels add any float bias in fp32; the references match that by casting it to x's dtype.
    return bias if bias is None or bias.dtype == x.dtype else bias.to(x.dtype)


def _validate_base(op: str, x, qweight, bias) -> None:
    check(isinstance(qweight, NF4Weight), f"{op}: `qweight` must be a fastft.quant.NF4Weight (from quantize_nf4), "
                                          f"got {type(qweight).__name__}")
    check(qweight.ndim == 2, f"{op}: `qweight` must be 2-D (out_features, in_features), got shape "
                             f"{tuple(qweight.shape)}")
    check(isinstance(x, torch.Tensor), f"{op}: `x` must be a torch.Tensor, got {type(x).__name__}")
    check(x.dtype in (torch.float32, torch.float16, torch.bfloat16),
          f"{op}: `x` must be float32, float16 or bfloat16, got {x.dtype}")
    check(x.dim() >= 1, f"{op}: `x` needs at least one dimension (..., in_features)")
    N, K = qweight.shape
    check(x.shape[-1] == K, f"{op}: `x` has {x.shape[-1]} features in its last dimension but `qweight` expects "
                            f"{K} (qweight shape {tuple(qweight.shape)})")
    check(x.device == qweight.device, f"{op}: `x` is on {x.device} but `qweight` is on {qweight.device}; "
                                      "move the weight with qweight.to(device)")
    if bias is not None:
        check(isinstance(bias, torch.Tensor) and bias.is_floating_point(),
              f"{op}: `bias` must be a floating-point tensor or None")
        check(tuple(bias.shape) == (N,), f"{op}: `bias` must have shape ({N},), got {tuple(bias.shape)}")
        check(bias.device == x.device, f"{op}: `bias` is on {bias.device} but `x` is on {x.device}")


def validate_qlora_linear_args(x, qweight, bias, lora_A, lora_B, scaling, dropout_p) -> None:
    op = "qlora_linear"
    _validate_base(op, x, qweight, bias)
    N, K = qweight.shape
    for name, t in (("lora_A", lora_A), ("lora_B", lora_B)):
        check(isinstance(t, torch.Tensor) and t.is_floating_point(),
              f"{op}: `{name}` must be a floating-point tensor, got {type(t).__name__}")
        check(t.device == x.device, f"{op}: `{name}` is on {t.device} but `x` is on {x.device}")
    check(lora_A.dim() == 2 and lora_A.shape[1] == K and lora_A.shape[0] >= 1,
          f"{op}: `lora_A` must have shape (r, {K}), got {tuple(lora_A.shape)}")
    r = lora_A.shape[0]
    check(tuple(lora_B.shape) == (N, r), f"{op}: `lora_B` must have shape ({N}, {r}) to match `qweight` and "
                                         f"`lora_A`, got {tuple(lora_B.shape)}")
    check(isinstance(scaling, (int, float)) and math.isfinite(scaling),
          f"{op}: `scaling` must be a finite number, got {scaling!r}")
    check(isinstance(dropout_p, (int, float)) and 0.0 <= dropout_p < 1.0,
          f"{op}: `dropout_p` must be in [0, 1), got {dropout_p!r}")


class QLoRALinearFunction(torch.autograd.Function):
    """lora_linear's fused forward/backward with an NF4 base GEMM (no weight gradient): per shape the in-register
    NF4 GEMM or the shared-scratch dequantize + dense LoRA GEMM, whichever measured faster (fastft.ops.qlora_path).
    """

    @staticmethod
    def forward(ctx, x, qweight, bias, lora_A, lora_B, scaling, dropout_p):
        ctx.qweight = qweight
        return fused_lora_forward(ctx, x, bias, lora_A, lora_B, scaling, dropout_p,
                                  lambda x2, xs, B_p, b: _base_gemm(qweight, x2, xs, B_p, b, forward=True))

    @staticmethod
    def backward(ctx, dy):
        need_x, _, need_b, need_A, need_B = ctx.needs_input_grad[:5]
        _, _, dx, db, dA, dB = fused_lora_backward(
            ctx, dy, lambda dy2, g, A_p, p, seed: _base_gemm(ctx.qweight, dy2, g, A_p, None, forward=False,
                                                             p_drop=p, seed=seed),
            need_x, need_b, need_A, need_B)
        return dx, None, db, dA, dB, None, None


def _base_gemm(qweight, a, lo, t, bias, *, forward: bool, p_drop: float = 0.0, seed: int = 0):
    """The forward's y = a·Wᵀ + lo·tᵀ + b (t = B_p) or dx = a·W + keep∘(lo·t) (t = A_p) on the selected path;
    lo = t = None: no rank tail (nf4_linear)."""
    from fastft.kernels.lora_gemm import lora_gemm
    from fastft.kernels.nf4_gemm import nf4_lora_gemm

    N, K = qweight.shape
    out_cols, red = (N, K) if forward else (K, N)
    rank = 0 if lo is None else lo.shape[1]  # nf4_linear: no rank tail
    key = qlora_path.path_key(a.shape[0], out_cols, red, rank, a.dtype, "forward" if forward else "dx")

    def run(path):
        if path == "fused":
            return nf4_lora_gemm(a, qweight.kernel_operand(), lo, t, bias, w_nk=forward, p_drop=p_drop, seed=seed)
        # the scratch is overwritten by the next layer: used here and dropped
        w = qlora_path.dequant_scratch(qweight, a.dtype)
        return lora_gemm(a, w, lo, t, bias, b_nk=forward, p_drop=p_drop, seed=seed)

    return qlora_path.select(key, run, fused_ok=nf4_fused_ok(qweight))


class NF4LinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, qweight, bias):
        from fastft.kernels import nf4_cuda

        N = qweight.shape[0]
        x2 = as_rows(x)
        w = qweight.kernel_operand()
        if nf4_cuda.supported(x2, w):  # decode: 1–16 tokens
            y = nf4_cuda.nf4_gemv(x2, w, bias)
        else:
            y = _base_gemm(qweight, x2, None, None, bias, forward=True)
        ctx.qweight = qweight
        ctx.meta = (x.shape, None if bias is None else bias.dtype)
        return y.view(*x.shape[:-1], N)

    @staticmethod
    def backward(ctx, dy):
        x_shape, bias_dtype = ctx.meta
        N = ctx.qweight.shape[0]
        dy2 = dy.reshape(-1, N).contiguous()
        dx = db = None
        if ctx.needs_input_grad[0]:
            dx = _base_gemm(ctx.qweight, dy2, None, None, None, forward=False).view(x_shape)
        if ctx.needs_input_grad[2] and bias_dtype is not None:
            db = dy2.sum(0, dtype=torch.float32).to(bias_dtype)
        return dx, None, db


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
        return qlora_linear_reference(x, qweight, bias, lora_A, lora_B, scaling, dropout_p)
    with torch.autocast(x.device.type, enabled=False):
        return QLoRALinearFunction.apply(x, qweight, bias, lora_A, lora_B, scaling, dropout_p)


def nf4_linear(x, qweight, bias=None, *, backend="auto"):
    """y = x·Wᵀ + b with W an NF4Weight (N×K, frozen); gradients for x and bias. See qlora_linear."""
    (x,) = autocast_inputs(x)
    _validate_base("nf4_linear", x, qweight, bias)
    backend = resolve_backend("nf4_linear", backend, x.device, arg="x")
    if backend == "torch" or x.numel() == 0 or not nf4_fused_ok(qweight):
        return nf4_linear_reference(x, qweight, bias)
    with torch.autocast(x.device.type, enabled=False):
        return NF4LinearFunction.apply(x, qweight, bias)
