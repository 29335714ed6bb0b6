"""The bottleneck adapter op:  y = h + act(h·Dᵀ + b_d)·Uᵀ + b_u  (Houlsby / Pfeiffer adapters).

`bottleneck_adapter` validates once, then dispatches: the Triton kernels (fastft.kernels.bottleneck_adapter: down
projection + bias + activation in one kernel, up projection + bias + residual in the other's epilogue; the
backward reuses them and fastft.kernels.rank_ops) on CUDA, `bottleneck_adapter_reference` elsewhere.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fastft.ops.shared import as_rows, autocast_inputs, check_backend, padded, resolve_backend

ACTIVATIONS = ("relu", "silu", "gelu_tanh", "tanh")


def activation_fn(name: str):
    return {"relu": F.relu, "silu": F.silu, "tanh": torch.tanh,
            "gelu_tanh": lambda t: F.gelu(t, approximate="tanh")}[name]


def bottleneck_adapter_reference(h, down_weight, down_bias, up_weight, up_bias, activation: str = "relu"):
    """Plain torch: h + up(act(down(h))), adapter weights cast to h's dtype (autograd through torch)."""
    dt = h.dtype
    z = activation_fn(activation)(F.linear(h, down_weight.to(dt), None if down_bias is None else down_bias.to(dt)))
    return h + F.linear(z, up_weight.to(dt), None if up_bias is None else up_bias.to(dt))


def _activation_grad(p: torch.Tensor, activation: str) -> torch.Tensor:
    """act'(p) in fp32."""
    p = p.float()
    if activation == "relu":
        return (p > 0).float()
    if activation == "tanh":
        return 1 - torch.tanh(p) ** 2
    if activation == "silu":
        s = torch.sigmoid(p)
        return s * (1 + p * (1 - s))
    c = 0.7978845608028654
    inner = c * (p + 0.044715 * p**3)
    t = torch.tanh(inner)
    return 0.5 * (1 + t) + 0.5 * p * (1 - t * t) * c * (1 + 3 * 0.044715 * p * p)


class BottleneckAdapterFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, down_weight, down_bias, up_weight, up_bias, activation):
        from fastft.kernels import bottleneck_adapter as kernels
        from fastft.kernels.rank_ops import rank_pad

        r, N = down_weight.shape
        R = rank_pad(r)
        dtype = h.dtype
        h2 = as_rows(h)
        D_p = padded(down_weight, R, N, dtype)
        U_p = padded(up_weight, N, R, dtype)
        bd = None if down_bias is None else padded(down_bias.float()[None], 1, R, torch.float32)[0]
        z, p = kernels.down_act(h2, D_p, bd, activation)
        bu = None if up_bias is None else up_bias.to(dtype)
        y = kernels.up_residual(h2, z, U_p, bu)
        ctx.save_for_backward(h2, D_p, U_p, z, p)
        ctx.meta = (h.shape, r, activation, down_weight.dtype, up_weight.dtype,
                    None if down_bias is None else down_bias.dtype, None if up_bias is None else up_bias.dtype)
        return y.view(h.shape)

    @staticmethod
    def backward(ctx, dy):
        from fastft.kernels import bottleneck_adapter as kernels
        from fastft.kernels import rank_ops

        h2, D_p, U_p, z, p = ctx.saved_tensors
        h_shape, r, activation, D_dtype, U_dtype, bd_dtype, bu_dtype = ctx.meta
        N = h2.shape[1]
        dy2 = dy.reshape(-1, N).to(h2.dtype)
        if not dy2.is_contiguous():
            dy2 = dy2.contiguous()
        need_h, need_D, need_bd, need_U, need_bu = ctx.needs_input_grad[:5]
        dh = dD = dbd = dU = dbu = None
        if need_h or need_D or need_bd:
            dz = rank_ops.rank_project(dy2, U_p.t(), scale=1.0)                    # dy·U    [M, R]
            dp = (dz.float() * _activation_grad(p, activation)).to(h2.dtype)  # ∘ act'(p)
            if need_h:
                dh = kernels.up_residual(dy2, dp, D_p.t(), None).view(h_shape)  # dy + dp·D
            if need_D:
                dD = rank_ops.rank_reduce(dp, h2)[:r].to(D_dtype)
            if need_bd and bd_dtype is not None:
                dbd = dp[:, :r].sum(0, dtype=torch.float32).to(bd_dtype)
        if need_U:
            dU = rank_ops.rank_reduce(z, dy2)[:r].t().to(U_dtype)
        if need_bu and bu_dtype is not None:
            dbu = dy2.sum(0, dtype=torch.float32).to(bu_dtype)
        return dh, dD, dbd, dU, dbu, None


def bottleneck_adapter(h, down_weight, down_bias, up_weight, up_bias, activation: str = "relu", *, backend="auto"):
    """y = h + act(h·Dᵀ + b_d)·Uᵀ + b_u with h (..., N), D (r, N), U (N, r); biases optional.
    backend: "auto" (Triton on CUDA, torch elsewhere), "triton" or "torch"."""
    check_backend("bottleneck_adapter", backend)
    if activation not in ACTIVATIONS:
        raise ValueError(f"bottleneck_adapter: `activation` must be one of {ACTIVATIONS}, got {activation!r}")
    (h,) = autocast_inputs(h)
    if not (isinstance(h, torch.Tensor) and h.is_floating_point() and h.dim() >= 1):
        raise ValueError("bottleneck_adapter: `h` must be a floating-point tensor (..., features)")
    N = h.shape[-1]
    if down_weight.dim() != 2 or down_weight.shape[1] != N:
        raise ValueError(f"bottleneck_adapter: `down_weight` must have shape (r, {N}), got {tuple(down_weight.shape)}")
    r = down_weight.shape[0]
    if tuple(up_weight.shape) != (N, r):
        raise ValueError(f"bottleneck_adapter: `up_weight` must have shape ({N}, {r}), got {tuple(up_weight.shape)}")
    for name, b, n in (("down_bias", down_bias, r), ("up_bias", up_bias, N)):
        if b is not None and tuple(b.shape) != (n,):
            raise ValueError(f"bottleneck_adapter: `{name}` must be None or of shape ({n},), got {tuple(b.shape)}")
    backend = resolve_backend("bottleneck_adapter", backend, h.device, arg="h")
    if backend == "torch" or h.numel() == 0:
        return bottleneck_adapter_reference(h, down_weight, down_bias, up_weight, up_bias, activation)
    with torch.autocast(h.device.type, enabled=False):
        return BottleneckAdapterFunction.apply(h, down_weight, down_bias, up_weight, up_bias, activation)
