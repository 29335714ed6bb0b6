"""The fused DoRA linear op:  y = σ ⊙ (x·Wᵀ + s·(x·Aᵀ)·Bᵀ) + b,  σ = m / ‖W + s·B·A‖_row (detached).

peft's DoRA (tuners/lora/dora.py) with its semantics: the row norm is detached from the graph (DoRA §4.3),
the bias is added after the magnitude scale, and with dropout the base term sees the undropped x:
    y = x·Wᵀ + b + (σ − 1)⊙(x_d·Wᵀ) + σ⊙s·(x_d·Aᵀ)·Bᵀ,   x_d = dropout(x).

The row norm ‖W + s·B·A‖ is summed directly, in fp32, without storing W + s·B·A (N×K): on the Triton path one
kernel forms it tile by tile (fastft.kernels.dora_row_norm), on the torch path in row chunks. (The expansion
‖W‖² + 2s·ΣB∘(W·Aᵀ) + s²·B(A·Aᵀ)Bᵀ costs the same pass over W but cancels to 0 — σ = inf — for rows where W + s·B·A
is small against W: fuzzing found it in fp16.)

Fused path (Triton, dropout 0): the LoRA GEMM of fastft.kernels.lora_gemm with σ as an epilogue column scale, its
rank tail xs·(b·B)ᵀ with xs = a·x·Aᵀ, a·b = s (fastft.ops.lora.split_scaling: |xs| ≤ |x·Aᵀ|, no fp16 overflow);
the bias is added after it, in a pass of its own, because backward needs the pre-bias output σ⊙z: dm from the
rounded y as Σ dy⊙(y − b) cancels when |b| >> |σ⊙z| (all of its bits in bf16 at |b| ~ 300). So with a bias two
output-sized tensors live (the saved σ⊙z and y), as on the NF4 path. Backward: dz = σ⊙dy never exists either —
dx's GEMM scales dy's K-columns by σ as it loads them, g = s·dy·diag(σ)·B, dB = b·diag(σ)·dyᵀ·xs, and
dm = Σ_tokens dy⊙(σ⊙z) / m (a split-M column reduction over the saved pre-bias output). NF4 bases (qweight an
NF4Weight): the NF4 GEMM without a column-scale epilogue, so σ and dy·σ are one small elementwise pass each.
CPU, dropout > 0 and backend="torch": `dora_linear_reference`.
Limitation: a magnitude entry that is exactly 0 gets gradient 0 on the fused path (its column's output is 0, so
the saved output carries no z). peft initialises m = ‖W‖, > 0 but for an all-zero row of W (whose output is NaN
in peft and here while B = 0), so only a loaded adapter holding an exact 0 meets it. In fp16 a magnitude far below
its row's norm puts σ⊙z into fp16's subnormals and its dm loses precision (m/‖W'‖ = 1e-5: 0.8% off; 1e-7: 93%).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from fastft.ops import overlap
from fastft.ops.compiled import compiling, needed, unused
from fastft.ops.compiled_args import fresh_like, weight_args, weight_from_args
from fastft.ops.nf4_matmul import nf4_matmul_torch
from fastft.ops.qlora_path import nf4_base_gemm, on_dequantized
from fastft.ops.lora import (backward_operands, rank_dtype, rank_operands, split_scaling, tail_factor,
                             times_b)
from fastft.ops.shared import (as_rows, autocast_inputs, autocast_off, check, check_backend, finite, nf4_fused_ok,
                               first_order_only, padded, resolve_backend, rows_to, safe_div, to_dtype)
from fastft.quant.nf4_weight import NF4Weight


def _dense(weight, dtype):
    return weight.dequantize(dtype) if isinstance(weight, NF4Weight) else weight.to(dtype)


_TORCH_CHUNK = 1 << 22  # elements of W' per chunk on the torch path (16 MiB in fp32)


@torch.no_grad()
def dora_row_norm(weight, lora_A, lora_B, scaling: float, dtype: torch.dtype | None = None,
                  backend: str = "auto") -> torch.Tensor:
    """‖W + s·B·A‖ per output row, fp32 (N,), with W + s·B·A summed directly (never stored: the Triton kernel forms
    it tile by tile; the torch path in row chunks), so a row that nearly cancels keeps its small norm.
    Triton: A and B in `dtype` (what the fused GEMM applies), NF4 weights decoded into the shared scratch buffer;
    torch: fp32 adapters."""
    dtype = dtype or lora_A.dtype
    device = lora_A.device
    backend = resolve_backend("dora_row_norm", backend, device, arg="lora_A")
    if backend == "triton" and compiling():
        return dora_row_norm_op(*weight_args(weight), lora_A.detach(), lora_B.detach(), float(scaling), dtype)
    if backend == "triton":
        from fastft.kernels.dora_row_norm import row_sq_norm
        from fastft.kernels.rank_ops import rank_pad

        N, K = weight.shape
        R = rank_pad(lora_A.shape[0])
        A_p, B_p = padded(lora_A.detach(), R, K, dtype), padded(lora_B.detach(), N, R, dtype)
        if isinstance(weight, NF4Weight):
            # read once by the kernel, before any later reuse of the scratch
            return on_dequantized(weight, dtype, lambda w: row_sq_norm(w, A_p, B_p, scaling)).sqrt()
        return row_sq_norm(weight.detach().to(dtype), A_p, B_p, scaling).sqrt()
    N, K = weight.shape
    # fp32, or fp64 for fp64 operands; autocast off: it would run B·A in bf16 (and fp64 ops are not its to cast)
    acc = torch.promote_types(torch.float32, torch.promote_types(dtype, lora_A.dtype))
    A, B = lora_A.detach().to(acc), lora_B.detach().to(acc)
    rows = max(1, _TORCH_CHUNK // max(1, K))

    def dense_rows(start, stop):
        stop = min(stop, N)
        return weight.dequantize_rows(start, stop, dtype) if isinstance(weight, NF4Weight) else weight[start:stop]

    with autocast_off(device.type):
        norms = [torch.linalg.vector_norm(dense_rows(i, i + rows).detach().to(acc) + scaling * (B[i:i + rows] @ A),
                                          dim=1) for i in range(0, N, rows)]
    return torch.cat(norms) if norms else torch.zeros(0, device=device)


def dora_linear_reference(x, weight, bias, lora_A, lora_B, magnitude, scaling, dropout_p=0.0, *, keep_mask=None,
                          row_norm=None):
    """peft's DoRA forward in plain torch (autograd through torch); `weight` dense or NF4Weight.
    `row_norm` (detached ‖W'‖) is computed directly from W + s·B·A when not given: the ground truth."""
    if row_norm is None:
        with torch.no_grad():
            W = _dense(weight, x.dtype)
            acc = torch.promote_types(torch.float32, W.dtype)
            row_norm = torch.linalg.norm(W.to(acc) + scaling * (lora_B.to(acc) @ lora_A.to(acc)), dim=1)
            del W
    # divided in the wider of the two dtypes (peft's promotion): a bf16 magnitude over an fp32 norm is not rounded
    sigma = (magnitude / row_norm.detach()).reshape(-1)  # (N,): broadcast over x's rows
    bias = None if bias is None else bias.to(x.dtype)
    if isinstance(weight, NF4Weight):  # dequantized again in backward: no dense W kept for it (as QLoRA's)
        def base(t, b=None):
            return nf4_matmul_torch(t, weight, b)
    else:
        W = weight.to(x.dtype)

        def base(t, b=None):
            return F.linear(t, W, b)
    # the rank path in rank_dtype (fp32 for fp16 x, as peft's fp32 adapters and LoRA's torch path run it): in fp16
    # a row with |x·Aᵀ| past 65504 gave NaN where peft's is finite, and dA overflowed at a 4-8× lower loss scale
    rd = rank_dtype(x.dtype)
    if keep_mask is None and dropout_p == 0.0:
        lora = F.linear(F.linear(x.to(rd), lora_A.to(rd)), lora_B.to(rd))
        y = (sigma * (base(x) + scaling * lora)).to(x.dtype)
        return y if bias is None else y + bias
    x_d = x * keep_mask.to(x.dtype) / (1.0 - dropout_p) if keep_mask is not None else F.dropout(x, dropout_p, True)
    lora = F.linear(F.linear(x_d.to(rd), lora_A.to(rd)), lora_B.to(rd))
    extra = (sigma - 1) * base(x_d) + sigma * lora * scaling
    return (base(x, bias) + extra).to(x.dtype)


def validate_dora_linear_args(x, weight, bias, lora_A, lora_B, magnitude, scaling, dropout_p) -> None:
    op = "dora_linear"
    for name, t in (("x", x), ("lora_A", lora_A), ("lora_B", lora_B), ("magnitude", magnitude)):
        check(isinstance(t, torch.Tensor) and t.is_floating_point(),
              lambda: f"{op}: `{name}` must be a floating-point tensor, got {type(t).__name__}")
    check(isinstance(weight, (torch.Tensor, NF4Weight)) and len(weight.shape) == 2,
          lambda: f"{op}: `weight` must be a 2-D tensor or NF4Weight (out_features, in_features)")
    N, K = weight.shape
    check(x.dim() >= 1 and x.shape[-1] == K,
          lambda: f"{op}: `x` must have {K} features in its last dimension (weight shape {tuple(weight.shape)}), "
                  f"got shape {tuple(x.shape)}")
    check(lora_A.dim() == 2 and lora_A.shape[1] == K, lambda: f"{op}: `lora_A` must have shape (r, {K}), got "
                                                              f"{tuple(lora_A.shape)}")
    r = lora_A.shape[0]
    check(tuple(lora_B.shape) == (N, r),
          lambda: f"{op}: `lora_B` must have shape ({N}, {r}), got {tuple(lora_B.shape)}")
    check(tuple(magnitude.shape) == (N,),
          lambda: f"{op}: `magnitude` must have shape ({N},), got {tuple(magnitude.shape)}")
    if bias is not None:  # a float bias of any dtype (added in x's dtype); an integer one is a mistake, not cast
        check(isinstance(bias, torch.Tensor) and bias.is_floating_point() and tuple(bias.shape) == (N,),
              lambda: f"{op}: `bias` must be None or a floating-point tensor of shape ({N},), got "
                      f"{_describe(bias)}")
    if not isinstance(weight, NF4Weight):  # an NF4 weight's dtype is its compute dtype, not a storage constraint
        check(x.dtype == weight.dtype,
              lambda: f"{op}: `x` is {x.dtype} but `weight` is {weight.dtype}; cast one of them or run under "
                      "torch.autocast")
    devices = {t.device for t in (x, weight, lora_A, lora_B, magnitude) + ((bias,) if bias is not None else ())}
    check(len(devices) == 1, lambda: f"{op}: all tensors must be on one device, got {sorted(map(str, devices))}")
    # messages built only on failure: dynamo cannot format a float while it traces with dynamic=True
    if not (isinstance(scaling, (int, float)) and not isinstance(scaling, bool) and finite(scaling)):
        raise ValueError(f"{op}: `scaling` must be a finite number (not a bool), got {scaling!r}")
    if not (isinstance(dropout_p, (int, float)) and 0.0 <= dropout_p < 1.0):
        raise ValueError(f"{op}: `dropout_p` must be in [0, 1), got {dropout_p!r}")


def _describe(t) -> str:
    return f"{t.dtype} of shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__


def dora_forward(x, weight, bias, lora_A, lora_B, magnitude, scaling, row_norm):
    """Both doors' forward (fastft.ops.compiled): (y, saved, meta) with saved = (x2, A_p, B_p, xs, sigma, saved_out)."""
    from fastft.kernels.lora_gemm import lora_gemm
    from fastft.kernels.rank_ops import rank_project

    N, r = lora_B.shape
    dtype = x.dtype
    x2, A_p, B_p = rank_operands(x, lora_A, lora_B, scaling)  # B_p = b·B, xs = a·x·Aᵀ: a·b = s (split_scaling)
    sigma = (magnitude.detach().float() / row_norm).contiguous()
    xs = rank_project(x2, A_p, scale=split_scaling(scaling, dtype)[0])
    nf4 = isinstance(weight, NF4Weight)
    if nf4:  # the base GEMM on the path FASTFT_QLORA_PATH forces or the measured one (fastft.ops.qlora_path)
        z = nf4_base_gemm(weight, x2, xs, B_p, None, forward=True)
        y = z * sigma  # in fp32 (sigma's dtype): one device op fewer than z.float() * sigma
        y = (y if bias is None else y + bias.float()).to(dtype)
        saved_out = z  # the unscaled output: dm = Σ dy·z / ‖W'‖
    else:
        saved_out = lora_gemm(x2, weight, xs, B_p, None, b_nk=True, col_scale=sigma)  # σ⊙z: dm = Σ dy·σ⊙z / m
        y = saved_out if bias is None else saved_out + to_dtype(bias, dtype)  # rounded as the reference rounds
    meta = (x.shape, scaling, r, nf4, lora_A.dtype, lora_B.dtype)
    return y, (x2, A_p, B_p, xs, sigma, saved_out), meta  # y as rows (M, N): see rows_to


def dora_backward(saved, meta, weight, dy, need_x, need_b, need_A, need_B, need_m):
    """Both doors' backward: (dx, db, dA, dB, dm), None where not needed. saved: (x2, A_p, B_g, xs, sigma, row_norm,
    magnitude, saved_out, bias); weight: the dense weight or the NF4Weight."""
    from fastft.kernels.lora_gemm import lora_gemm
    from fastft.kernels.rank_ops import rank_project, rank_reduce, rank_reduce_pair
    from fastft.kernels.column_dot import column_dot

    x2, A_p, B_g, xs, sigma, row_norm, magnitude, saved_out, bias = saved  # B_g = B itself (backward_operands)
    x_shape, scaling, r, nf4, A_dtype, B_dtype = meta
    g_scale, b_scale = split_scaling(scaling, x2.dtype)  # g' = a·dy·diag(σ)·B, the dx tail's b·A_p
    dB_scale = sigma if b_scale == 1.0 else sigma * b_scale  # dB = b·diag(σ)·dyᵀ·xs
    N = B_g.shape[0]
    dtype = x2.dtype
    dy2 = to_dtype(dy.reshape(-1, N), dtype)
    if not dy2.is_contiguous():
        dy2 = dy2.contiguous()
    dx = db = dA = dB = dm = g = None
    if need_x or need_A:
        B_sigma = (B_g * sigma[:, None]).to(dtype)  # computed in fp32 (sigma's dtype): one device op fewer
        g = rank_project(dy2, B_sigma.t(), scale=g_scale)  # a·dy·diag(σ)·B = s·dy·diag(σ)·B / b
    # dA, dB and dm do not wait for the dx GEMM: with FASTFT_LORA_OVERLAP=1 on a side stream beside it, launched
    # after it (fastft.ops.overlap, as the LoRA backward)
    side = overlap.fork(dy2.device, xs.shape[1]) if need_x and (need_A or need_B or need_m) else None
    room = side is not None
    if need_x:
        A_g = tail_factor(A_p, b_scale)
        if nf4:
            dz = (dy2 * sigma).to(dtype)  # in fp32, as sigma
            dx = nf4_base_gemm(weight, dz, g, A_g, None, forward=False, leave_room=room)
        else:
            dx = lora_gemm(dy2, weight, g, A_g, None, b_nk=False, k_scale=sigma, leave_room=room)
        dx = dx.view(*x_shape)
    with overlap.on(side):
        if need_A and need_B:  # one launch for both
            dA, dB = rank_reduce_pair(g, x2, xs, dy2, beside_gemm=room)
            dA, dB = to_dtype(times_b(dA[:r], b_scale), A_dtype), to_dtype(dB[:, :r] * dB_scale[:, None], B_dtype)
        elif need_A:
            dA = to_dtype(times_b(rank_reduce(g, x2, beside_gemm=room)[:r], b_scale), A_dtype)
        elif need_B:  # in B's own layout, as the pair gives it
            dB = padded(rank_reduce(xs, dy2, beside_gemm=room)[:r].t() * dB_scale[:, None], N, r, B_dtype)
        if need_m:
            if nf4:
                dm = column_dot(dy2, saved_out) / row_norm
            else:
                dm = safe_div(column_dot(dy2, saved_out), to_dtype(magnitude.detach(), torch.float32))
            dm = to_dtype(dm, magnitude.dtype)
    overlap.join(side, read=(g, x2, xs, dy2, dB_scale, saved_out, row_norm, magnitude), made=(dA, dB, dm))
    if need_b and bias is not None:
        db = to_dtype(dy2.sum(0, dtype=torch.float32), bias.dtype)
    return dx, db, dA, dB, dm


class DoRALinearFunction(torch.autograd.Function):
    """Dropout-free DoRA through the fused kernels; `weight` dense (column-scale epilogue) or NF4Weight.
    The eager door (fastft.ops.compiled)."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, magnitude, scaling, row_norm):
        y, (x2, _, _, xs, sigma, saved_out), ctx.meta = dora_forward(x, weight, bias, lora_A, lora_B, magnitude,
                                                                     scaling, row_norm)
        nf4 = ctx.meta[3]
        # the dense W only where dx reads it (under autocast it is a cast copy); A and B themselves, not their
        # padded/cast copies: backward rebuilds those (lora.backward_operands)
        ctx.qweight, weight_t = (weight, None) if nf4 else (None, weight if ctx.needs_input_grad[0] else None)
        ctx.save_for_backward(x2, lora_A, lora_B, xs, sigma, row_norm, magnitude, saved_out, bias, weight_t)
        return y

    @staticmethod
    @first_order_only
    def backward(ctx, dy):
        x2, lora_A, lora_B, xs, *rest, weight = ctx.saved_tensors
        saved = (*backward_operands(x2, lora_A, lora_B, xs), *rest)
        need_x, _, need_b, need_A, need_B, need_m = ctx.needs_input_grad[:6]
        dx, db, dA, dB, dm = dora_backward(saved, ctx.meta, ctx.qweight if ctx.meta[3] else weight, dy, need_x,
                                           need_b, need_A, need_B, need_m)
        return dx, None, db, dA, dB, dm, None, None


# The traced doors (fastft.ops.compiled): fastft::dora_row_norm (the Triton row norm, no gradient) and
# fastft::dora_linear + backward. The weight crosses as compiled_args.weight_args (a dense tensor, or an NF4Weight's
# inner tensors and fields); the rank-padded factors are padded again in backward from the inputs; on a dense weight
# without a bias the output itself is what backward reads for dm (custom-op outputs cannot alias), so the pre-bias
# output (z for NF4, σ⊙z for a dense weight) is returned only for NF4 or with a bias (_own_saved_out).
@torch.library.custom_op("fastft::dora_row_norm", mutates_args=())
def dora_row_norm_op(w_parts: list[torch.Tensor], w_ints: list[int], lora_A: torch.Tensor, lora_B: torch.Tensor,
                     scaling: float, dtype: torch.dtype) -> torch.Tensor:
    return dora_row_norm(weight_from_args(w_parts, w_ints), lora_A, lora_B, scaling, dtype, backend="triton")


@dora_row_norm_op.register_fake
def _(w_parts, w_ints, lora_A, lora_B, scaling, dtype):
    return lora_A.new_empty((lora_B.shape[0],), dtype=torch.float32)


@torch.library.custom_op("fastft::dora_linear", mutates_args=())
def dora_linear_op(x: torch.Tensor, w_parts: list[torch.Tensor], w_ints: list[int], bias: Optional[torch.Tensor],
                   lora_A: torch.Tensor, lora_B: torch.Tensor, magnitude: torch.Tensor, scaling: float,
                   row_norm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    weight = weight_from_args(w_parts, w_ints)
    y, (_, _, _, xs, sigma, saved_out), meta = dora_forward(x, weight, bias, lora_A, lora_B, magnitude, scaling,
                                                            row_norm)
    return rows_to(y, x), xs, sigma, (saved_out if _own_saved_out(w_ints, bias) else unused(x))


def _own_saved_out(w_ints, bias) -> bool:
    """Whether backward's pre-bias output is a tensor of its own (NF4, or a bias), not the output y itself."""
    return bool(w_ints) or bias is not None


@dora_linear_op.register_fake
def _(x, w_parts, w_ints, bias, lora_A, lora_B, magnitude, scaling, row_norm):
    from fastft.kernels.rank_ops import rank_pad

    N = lora_B.shape[0]
    M = x.numel() // x.shape[-1]
    z = x.new_empty((M, N)) if _own_saved_out(w_ints, bias) else unused(x)
    return (x.new_empty((*x.shape[:-1], N)), x.new_empty((M, rank_pad(lora_A.shape[0]))),
            x.new_empty((N,), dtype=torch.float32), z)


@torch.library.custom_op("fastft::dora_linear_backward", mutates_args=())
def dora_linear_backward_op(dy: torch.Tensor, x: torch.Tensor, w_parts: list[torch.Tensor], w_ints: list[int],
                            bias: Optional[torch.Tensor], lora_A: torch.Tensor, lora_B: torch.Tensor,
                            magnitude: torch.Tensor, row_norm: torch.Tensor, xs: torch.Tensor, sigma: torch.Tensor,
                            saved_out: torch.Tensor, scaling: float, need_x: bool, need_b: bool, need_A: bool,
                            need_B: bool, need_m: bool
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    weight = weight_from_args(w_parts, w_ints)
    nf4 = isinstance(weight, NF4Weight)
    saved = (*backward_operands(x, lora_A, lora_B, xs), sigma, row_norm, magnitude,
             saved_out if nf4 else as_rows(saved_out), bias)
    meta = (x.shape, scaling, lora_A.shape[0], nf4, lora_A.dtype, lora_B.dtype)
    grads = dora_backward(saved, meta, weight, dy, need_x, need_b, need_A, need_B, need_m)
    return tuple(g if g is not None else unused(like) for g, like in zip(grads, (x, dy, lora_A, lora_B, magnitude)))


@dora_linear_backward_op.register_fake
def _(dy, x, w_parts, w_ints, bias, lora_A, lora_B, magnitude, row_norm, xs, sigma, saved_out, scaling, need_x,
      need_b, need_A, need_B, need_m):
    db = bias.new_empty(bias.shape) if need_b and bias is not None else unused(dy)
    dB = lora_B.new_empty(lora_B.shape) if need_B else unused(lora_B)
    return fresh_like(x, need_x), db, fresh_like(lora_A, need_A), dB, fresh_like(magnitude, need_m)


def _setup_context(ctx, inputs, output):
    x, w_parts, w_ints, bias, lora_A, lora_B, magnitude, scaling, row_norm = inputs
    y, xs, sigma, z = output
    ctx.save_for_backward(x, bias, lora_A, lora_B, magnitude, row_norm, xs, sigma,
                          z if _own_saved_out(w_ints, bias) else y, *w_parts)
    ctx.meta = (w_ints, scaling)


def _backward_op(ctx, dy, _dxs, _dsigma, _dz):
    x, bias, lora_A, lora_B, magnitude, row_norm, xs, sigma, saved_out, *w_parts = ctx.saved_tensors
    w_ints, scaling = ctx.meta
    need = ctx.needs_input_grad
    needs = (need[0], need[3] and bias is not None, need[4], need[5], need[6])
    grads = dora_linear_backward_op(dy, x, w_parts, w_ints, bias, lora_A, lora_B, magnitude, row_norm, xs, sigma,
                                    saved_out, scaling, *needs)
    dx, db, dA, dB, dm = (needed(g, n) for g, n in zip(grads, needs))
    # no gradient for the weight's parts; an empty int list is a list to autograd's structure check, others a leaf
    return dx, [None] * len(w_parts), (None if w_ints else []), db, dA, dB, dm, None, None


dora_linear_op.register_autograd(_backward_op, setup_context=_setup_context)


def dora_linear(x, weight, bias, lora_A, lora_B, magnitude, scaling, dropout_p=0.0, *, backend="auto"):
    """peft's DoRA linear (see module doc) with W (N×K) frozen — a tensor or an NF4Weight — A (r×K), B (N×r) and
    the magnitude m (N,) trained (a W that requires grad gets it, on the torch path).
    backend: "auto" (Triton on CUDA, torch elsewhere), "triton" or "torch"."""
    check_backend("dora_linear", backend)
    x, weight = autocast_inputs(x, weight)
    validate_dora_linear_args(x, weight, bias, lora_A, lora_B, magnitude, scaling, dropout_p)
    scaling, dropout_p = float(scaling), float(dropout_p)
    backend = resolve_backend("dora_linear", backend, x.device, arg="x", dtype=x.dtype)
    row_norm = dora_row_norm(weight, lora_A, lora_B, scaling, dtype=x.dtype, backend=backend)
    # the fused path gives W no gradient: a trainable W (a partly unfrozen base) takes the torch path
    trained_weight = isinstance(weight, torch.Tensor) and weight.requires_grad and torch.is_grad_enabled()
    # an empty y (no tokens, or out_features 0): nothing for the kernels to do. The NF4 layout rule is asked last:
    # it reads the kernels' module, which needs triton (the torch backend runs without it)
    if (backend == "torch" or dropout_p > 0.0 or x.numel() == 0 or weight.shape[0] == 0 or trained_weight
            or (isinstance(weight, NF4Weight) and not nf4_fused_ok(weight))):
        return dora_linear_reference(x, weight, bias, lora_A, lora_B, magnitude, scaling, dropout_p,
                                     row_norm=row_norm)
    with autocast_off(x.device.type):
        if not compiling():
            y = DoRALinearFunction.apply(x, weight, bias, lora_A, lora_B, magnitude, scaling, row_norm)
            return rows_to(y, x)
        return dora_linear_op(x, *weight_args(weight), bias, lora_A, lora_B, magnitude, scaling, row_norm)[0]
