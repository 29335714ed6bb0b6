"""The bottleneck adapter op:  y = h + act(h·Dᵀ + b_d)·Uᵀ + b_u  (Houlsby / Pfeiffer adapters).

`bottleneck_adapter` validates once, then dispatches: the Triton kernels (fastft.kernels.bottleneck_adapter: down
projection + bias + activation in one kernel, up projection + bias + residual in the other's epilogue; the
backward reuses them and fastft.kernels.rank_ops) on CUDA, `bottleneck_adapter_reference` elsewhere.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from fastft.ops.compiled import compiling, needed, unused
from fastft.ops.shared import (as_rows, autocast_inputs, autocast_off, check_backend, check_tensor, first_order_only,
                               padded, power_of_two_scales, resolve_backend, rows_to, to_dtype)

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
    """act'(p) in fp32; relu's as a bool mask (a multiply casts it to 1.0/0.0 on the fly: two device ops fewer).
    relu's p may be z = relu(p) instead (_grad_source)."""
    if activation == "relu":
        return p > 0
    p = p.float()
    if activation == "tanh":
        return 1 - torch.tanh(p) ** 2
    if activation == "silu":
        s = torch.sigmoid(p)
        return s * (1 + p * (1 - s))
    c = 0.7978845608028654
    inner = c * (p + 0.044715 * p**3)
    t = torch.tanh(inner)
    return 0.5 * (1 + t) + 0.5 * p * (1 - t * t) * c * (1 + 3 * 0.044715 * p * p)


def _grad_source(p: torch.Tensor, activation: str) -> torch.Tensor | None:
    """What backward reads act'(p) from, kept for backward besides z (which dU needs): nothing more for relu, whose
    mask z > 0 is exactly p > 0 (the kernel rounds one fp32 value into both where it is positive, and both are ≤ 0 or
    NaN elsewhere); p for the others. z = act(p) cannot be redone from p exactly (the kernel applies act to the fp32
    accumulator before rounding p), so these keep both."""
    return None if activation == "relu" else p


def _padded_weights(down_weight, up_weight, dtype):
    """D (R, N) and U (N, R) zero-padded to the kernels' rank R, in h's dtype."""
    from fastft.kernels.rank_ops import rank_pad

    r, N = down_weight.shape
    R = rank_pad(r)
    return padded(down_weight, R, N, dtype), padded(up_weight, N, R, dtype)


def _forward(h2, D_p, U_p, down_bias, up_bias, activation):
    """(y rows, z, p): z = act(p), p = h·Dᵀ + b_d, both (M, R) (backward needs them)."""
    from fastft.kernels import bottleneck_adapter as kernels

    R = D_p.shape[0]
    bd = None if down_bias is None else padded(down_bias.float()[None], 1, R, torch.float32)[0]
    z, p = kernels.down_act(h2, D_p, bd, activation)
    bu = None if up_bias is None else to_dtype(up_bias, h2.dtype)
    return kernels.up_residual(h2, z, U_p, bu), z, p


def column_scaled(dp32: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(dp·diag(c) in fp16, c): c_j the power of two that brings column j's largest |value| into [2^13, 2^14) (1 for
    an all-zero or non-finite column), so the fp16 operand of dD = dpᵀ·h keeps 11 bits wherever its column's scale
    is, with room below fp16's 65504; the products are exact and unscaled_rows divides them out in fp32. On the
    device: no host sync."""
    top = dp32.abs().amax(0) if dp32.shape[0] else dp32.new_zeros(dp32.shape[1])  # no rows: amax refuses
    c = power_of_two_scales(top, 14)
    return (dp32 * c).to(torch.float16), c


def unscaled_rows(g: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
    """g [R, ...] (fp32) with row j divided by c_j (column_scaled's), or g as it is without c."""
    return g if c is None else g / c.view(-1, *([1] * (g.dim() - 1)))


def _backward(dy, h2, D_p, U_p, z, p, r, activation, needs, dtypes):
    """(dh rows, dD, dbd, dU, dbu), None where not needed; needs: (h, D, b_d, U, b_u); dtypes: D, U, b_d, b_u
    (None for an absent bias); p None: act'(p) read from z (relu, _grad_source)."""
    from fastft.kernels import bottleneck_adapter as kernels
    from fastft.kernels import rank_ops

    D_dtype, U_dtype, bd_dtype, bu_dtype = dtypes
    N = h2.shape[1]
    dy2 = to_dtype(dy.reshape(-1, N), h2.dtype)
    if not dy2.is_contiguous():
        dy2 = dy2.contiguous()
    need_h, need_D, need_bd, need_U, need_bu = needs
    dh = dD = dbd = dU = dbu = None
    if need_h or need_D or need_bd:
        fp16 = h2.dtype == torch.float16  # dz fp32 there: dy·U in fp16 falls into subnormals at a small U
        dz = rank_ops.rank_project(dy2, U_p.t(), scale=1.0, out_dtype=torch.float32 if fp16 else None)  # dy·U
        dp32 = dz.float() * _activation_grad(z if p is None else p, activation)  # ∘ act'(p), [M, R]
        dp = to_dtype(dp32, h2.dtype)
        dp_D, c = column_scaled(dp32) if fp16 else (dp, None)  # dD's operand: dp·diag(c) in fp16
        if need_h:
            dh = kernels.up_residual(dy2, dp, D_p.t(), None)  # dy + dp·D
        if need_D and need_U:  # one launch for both, dU already in U's own (N, R) layout
            dD, dU = rank_ops.rank_reduce_pair(dp_D, h2, z, dy2)
            dD, dU = to_dtype(unscaled_rows(dD, c)[:r], D_dtype), dU[:, :r]
        elif need_D:
            dD = to_dtype(unscaled_rows(rank_ops.rank_reduce(dp_D, h2), c)[:r], D_dtype)
        if need_bd and bd_dtype is not None:
            dbd = to_dtype((dp32 if fp16 else dp)[:, :r].sum(0, dtype=torch.float32), bd_dtype)
    if need_U:
        if dU is None:
            dU = rank_ops.rank_reduce(z, dy2)[:r].t()
        dU = padded(dU, N, r, U_dtype)  # contiguous (N, r): autograd accumulates it without a layout copy
    if need_bu and bu_dtype is not None:
        dbu = to_dtype(dy2.sum(0, dtype=torch.float32), bu_dtype)
    return dh, dD, dbd, dU, dbu


def _dtype(t):
    return None if t is None else t.dtype


class BottleneckAdapterFunction(torch.autograd.Function):
    """The eager door (fastft.ops.compiled)."""

    @staticmethod
    def forward(ctx, h, down_weight, down_bias, up_weight, up_bias, activation):
        h2 = as_rows(h)
        D_p, U_p = _padded_weights(down_weight, up_weight, h.dtype)
        y, z, p = _forward(h2, D_p, U_p, down_bias, up_bias, activation)
        # the weights themselves, not their padded/cast copies (rebuilt in backward, as the traced door does)
        ctx.save_for_backward(h2, down_weight, up_weight, z, _grad_source(p, activation))
        ctx.meta = (h.shape, down_weight.shape[0], activation,
                    (down_weight.dtype, up_weight.dtype, _dtype(down_bias), _dtype(up_bias)))
        return y  # as rows: see rows_to

    @staticmethod
    @first_order_only
    def backward(ctx, dy):
        h2, down_weight, up_weight, z, p = ctx.saved_tensors
        h_shape, r, activation, dtypes = ctx.meta
        D_p, U_p = _padded_weights(down_weight, up_weight, h2.dtype)
        dh, dD, dbd, dU, dbu = _backward(dy, h2, D_p, U_p, z, p, r, activation, ctx.needs_input_grad[:5], dtypes)
        return (None if dh is None else dh.view(*h_shape)), dD, dbd, dU, dbu, None


# The traced door: fastft::bottleneck_adapter and its backward as custom ops (fastft.ops.compiled). z and p are
# extra outputs of the forward (p kept for backward only where _grad_source says so: for relu z is passed in its
# place); the padded weights (often the weights themselves) are re-derived in the backward.
@torch.library.custom_op("fastft::bottleneck_adapter", mutates_args=())
def bottleneck_adapter_op(h: torch.Tensor, down_weight: torch.Tensor, down_bias: Optional[torch.Tensor],
                          up_weight: torch.Tensor, up_bias: Optional[torch.Tensor],
                          activation: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    D_p, U_p = _padded_weights(down_weight, up_weight, h.dtype)
    y, z, p = _forward(as_rows(h), D_p, U_p, down_bias, up_bias, activation)
    return rows_to(y, h), z, p


@bottleneck_adapter_op.register_fake
def _(h, down_weight, down_bias, up_weight, up_bias, activation):
    from fastft.kernels.rank_ops import rank_pad

    # int(): a symbolic rank is specialised (a guard; the rank is fixed per adapter), the token count stays symbolic
    M, R = h.numel() // h.shape[-1], rank_pad(int(down_weight.shape[0]))
    return h.new_empty(h.shape), h.new_empty((M, R)), h.new_empty((M, R))


@torch.library.custom_op("fastft::bottleneck_adapter_backward", mutates_args=())
def bottleneck_adapter_backward_op(
        dy: torch.Tensor, h: torch.Tensor, down_weight: torch.Tensor, down_bias: Optional[torch.Tensor],
        up_weight: torch.Tensor, up_bias: Optional[torch.Tensor], z: torch.Tensor, p: torch.Tensor, activation: str,
        needs: list[bool]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    D_p, U_p = _padded_weights(down_weight, up_weight, h.dtype)
    dtypes = (down_weight.dtype, up_weight.dtype, _dtype(down_bias), _dtype(up_bias))
    grads = _backward(dy, as_rows(h), D_p, U_p, z, p, down_weight.shape[0], activation, needs, dtypes)
    grads = (None if grads[0] is None else grads[0].view(h.shape),) + grads[1:]
    return tuple(unused(h) if g is None else g for g in grads)


@bottleneck_adapter_backward_op.register_fake
def _(dy, h, down_weight, down_bias, up_weight, up_bias, z, p, activation, needs):
    like = (h, down_weight, down_bias, up_weight, up_bias)
    return tuple(t.new_empty(t.shape) if need and t is not None else unused(h) for t, need in zip(like, needs))


def _setup_context(ctx, inputs, output):
    h, down_weight, down_bias, up_weight, up_bias, activation = inputs
    ctx.save_for_backward(h, down_weight, down_bias, up_weight, up_bias, output[1],
                          _grad_source(output[2], activation))
    ctx.activation = activation


def _backward_op(ctx, dy, _dz, _dp):
    h, down_weight, down_bias, up_weight, up_bias, z, p = ctx.saved_tensors
    needs = [n and t is not None for n, t in zip(ctx.needs_input_grad[:5], (h, down_weight, down_bias, up_weight,
                                                                              up_bias))]
    grads = bottleneck_adapter_backward_op(dy, h, down_weight, down_bias, up_weight, up_bias, z,
                                           z if p is None else p, ctx.activation, needs)
    return (*(needed(g, n) for g, n in zip(grads, needs)), None)


bottleneck_adapter_op.register_autograd(_backward_op, setup_context=_setup_context)


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
    for name, t in (("down_weight", down_weight), ("up_weight", up_weight)):
        check_tensor("bottleneck_adapter", name, t)
    for name, t in (("down_bias", down_bias), ("up_bias", up_bias)):
        if t is not None:
            check_tensor("bottleneck_adapter", name, t)
    if down_weight.dim() != 2 or down_weight.shape[1] != N:
        raise ValueError(f"bottleneck_adapter: `down_weight` must have shape (r, {N}), got {tuple(down_weight.shape)}")
    r = down_weight.shape[0]
    if tuple(up_weight.shape) != (N, r):
        raise ValueError(f"bottleneck_adapter: `up_weight` must have shape ({N}, {r}), got {tuple(up_weight.shape)}")
    for name, b, n in (("down_bias", down_bias, r), ("up_bias", up_bias, N)):
        if b is not None and tuple(b.shape) != (n,):
            raise ValueError(f"bottleneck_adapter: `{name}` must be None or of shape ({n},), got {tuple(b.shape)}")
    backend = resolve_backend("bottleneck_adapter", backend, h.device, arg="h", dtype=h.dtype)
    if backend == "torch" or h.numel() == 0:
        return bottleneck_adapter_reference(h, down_weight, down_bias, up_weight, up_bias, activation)
    with autocast_off(h.device.type):
        if compiling():
            return bottleneck_adapter_op(h, down_weight, down_bias, up_weight, up_bias, activation)[0]
        return rows_to(BottleneckAdapterFunction.apply(h, down_weight, down_bias, up_weight, up_bias, activation), h)
