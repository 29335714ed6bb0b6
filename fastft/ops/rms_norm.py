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

import torch

from fastft.ops.shared import as_rows, check, check_tensor, resolve_backend

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


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, residual, eps, offset, cast):
        from fastft.kernels import rms_norm as kernels

        x2 = as_rows(x)
        r2 = as_rows(residual) if residual is not None else None
        y, h, rstd = kernels.rms_norm_forward(x2, weight, eps, offset, cast == "input",
                                              _out_dtype(x.dtype, weight.dtype, cast), r2)
        h_saved = h if h is not None else x2
        ctx.save_for_backward(h_saved, weight, rstd)
        ctx.meta = (x.shape, offset, residual is not None)
        y = y.view(*x.shape[:-1], y.shape[-1])
        if residual is None:
            return y
        return y, h.view(x.shape)

    @staticmethod
    def backward(ctx, dy, dh=None):
        from fastft.kernels import rms_norm as kernels

        h, weight, rstd = ctx.saved_tensors
        shape, offset, has_residual = ctx.meta
        dy2 = as_rows(dy)
        dh2 = as_rows(dh) if (has_residual and dh is not None) else None
        need_w = ctx.needs_input_grad[1]
        dx, dw = kernels.rms_norm_backward(dy2, h, weight, rstd, offset, dh2, need_w)
        dx = dx.view(shape)
        dw = dw.to(weight.dtype) if dw is not None else None
        dres = dx if has_residual and ctx.needs_input_grad[2] else None
        return (dx if ctx.needs_input_grad[0] else None), dw, dres, None, None, None


def validate_rms_norm_args(x, weight, eps, offset, residual, cast) -> None:
    op = "rms_norm"
    check_tensor(op, "x", x, dim=1)
    check_tensor(op, "weight", weight)
    N = x.shape[-1]
    check(weight.dim() == 1 and weight.shape[0] == N,
          f"{op}: `weight` must have shape ({N},) to match x's last dimension, got {tuple(weight.shape)}")
    check(weight.device == x.device, f"{op}: `weight` is on {weight.device} but `x` is on {x.device}")
    check(isinstance(eps, (int, float)) and eps > 0, f"{op}: `eps` must be a positive number, got {eps!r}")
    check(isinstance(offset, (int, float)), f"{op}: `offset` must be a number (0 for Llama, 1 for Gemma), got "
                                            f"{offset!r}")
    check(cast in CASTS, f"{op}: `cast` must be one of {CASTS} or None, got {cast!r}")
    if residual is not None:
        check_tensor(op, "residual", residual)
        check(residual.shape == x.shape, f"{op}: `residual` must have x's shape {tuple(x.shape)}, got "
                                         f"{tuple(residual.shape)}")
        check(residual.dtype == x.dtype, f"{op}: `residual` is {residual.dtype} but `x` is {x.dtype}")
        check(residual.device == x.device, f"{op}: `residual` is on {residual.device} but `x` is on {x.device}")


def rms_norm(x, weight, eps=1e-6, *, offset=0.0, residual=None, cast=None, backend="auto"):
    """y = (offset + w)·x̂ over the last dimension; with `residual`, h = x + residual is normed and (y, h) returned
    (the pre-norm pattern: h feeds the next residual add).

    cast: "input" (Llama rounding, default when offset == 0) or "fp32" (Gemma rounding, default otherwise).
    backend: "auto" (Triton on CUDA, torch elsewhere), "triton" or "torch".
    """
    cast = cast if cast is not None else ("input" if offset == 0.0 else "fp32")
    validate_rms_norm_args(x, weight, eps, offset, residual, cast)
    backend = resolve_backend("rms_norm", backend, x.device)
    if backend == "torch" or x.numel() == 0:
        return rms_norm_reference(x, weight, eps, offset=offset, residual=residual, cast=cast)
    with torch.autocast(x.device.type, enabled=False):
        return RMSNormFunction.apply(x, weight, residual, float(eps), float(offset), cast)
