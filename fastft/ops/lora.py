"""The fused LoRA linear op:  y = x·Wᵀ + b + s·(dropout(x)·Aᵀ)·Bᵀ.

`lora_linear` validates its inputs once, then dispatches: the Triton kernels (fastft.kernels.lora_gemm, rank_ops)
on CUDA, the pure-torch `lora_linear_reference` everywhere else. The reference is the ground truth the
tests compare against, and the CPU path.
"""
from __future__ import annotations

import functools
import math
from typing import Optional

import torch
import torch.nn.functional as F

from fastft.ops import lora_path, overlap, shared
from fastft.ops.compiled import compiling, needed, unused
from fastft.ops.compiled_args import fresh_like, refuse_replayed_dropout, seed_int, seeded_ops, traced_seed
from fastft.ops.shared import (as_rows, autocast_inputs, autocast_off, check, check_backend, finite,
                               first_order_only, padded, resolve_backend, rows_to, to_dtype)


def lora_linear_reference(x, weight, bias, lora_A, lora_B, scaling, dropout_p=0.0, *, keep_mask=None):
    """Plain torch, autograd through torch. `keep_mask` (bool, x-shaped) replaces torch's own dropout draw.
    The rank path runs in rank_dtype(x.dtype): in fp32 for fp16 x, as peft runs it with its fp32 adapters."""
    if bias is not None and bias.dtype != x.dtype:  # the fused kernels take any float bias (added in fp32)
        bias = bias.to(x.dtype)
    return add_rank_path(x, F.linear(x, weight, bias), lora_A, lora_B, scaling, dropout_p, keep_mask=keep_mask)


def add_rank_path(x, y, lora_A, lora_B, scaling, dropout_p=0.0, *, keep_mask=None):
    """y + s·(dropout(x)·Aᵀ)·Bᵀ as lora_linear_reference adds it to the base output y (plain torch, autograd)."""
    dtype = rank_dtype(x.dtype)
    lora_in = x.to(dtype)
    if keep_mask is not None:
        lora_in = lora_in * keep_mask.to(dtype) / (1.0 - dropout_p)
    elif dropout_p > 0.0:
        lora_in = F.dropout(lora_in, dropout_p, training=True)
    lora = F.linear(F.linear(lora_in, lora_A.to(dtype)), lora_B.to(dtype))
    y = y + scaling * lora
    return y if dtype == x.dtype else y.to(x.dtype)  # fp16: the sum in fp32, rounded once (as peft's)


def rank_dtype(dtype: torch.dtype) -> torch.dtype:
    """What lora_linear_reference computes the rank path in: fp32 for fp16 inputs, else their own dtype. In fp16,
    autograd's dA = (s·dy·B)ᵀ·x, a sum over every row, overflowed (inf: GradScaler skips the step) at a loss scale
    4× below peft's on a tiny Llama (alpha/r = 4; the kernels sum dA in fp32). bf16 has fp32's range and keeps its
    own dtype, as the kernels' rank path does. Under torch.autocast the matmuls still run in its dtype, as peft's."""
    return torch.float32 if dtype == torch.float16 else dtype


def validate_lora_linear_args(x, weight, bias, lora_A, lora_B, scaling, dropout_p) -> None:
    # messages are built only on failure (lambdas): formatting them on every call was a fifth of the op's host time
    for name, t in (("x", x), ("weight", weight), ("lora_A", lora_A), ("lora_B", lora_B)):
        check(isinstance(t, torch.Tensor),
              lambda: f"lora_linear: `{name}` must be a torch.Tensor, got {type(t).__name__}")
        check(t.is_floating_point(), lambda: f"lora_linear: `{name}` must be a floating-point tensor, got {t.dtype}")
    check(x.dim() >= 1, "lora_linear: `x` needs at least one dimension (..., in_features)")
    check(weight.dim() == 2,
          lambda: f"lora_linear: `weight` must be 2-D (out_features, in_features), got shape {tuple(weight.shape)}")
    N, K = weight.shape
    check(x.shape[-1] == K, lambda: f"lora_linear: `x` has {x.shape[-1]} features in its last dimension but "
                                    f"`weight` expects {K} (weight shape {tuple(weight.shape)})")
    check(lora_A.dim() == 2 and lora_A.shape[1] == K and lora_A.shape[0] >= 1,
          lambda: f"lora_linear: `lora_A` must have shape (r, {K}), got {tuple(lora_A.shape)}")
    r = lora_A.shape[0]
    check(lora_B.dim() == 2 and lora_B.shape[0] == N and lora_B.shape[1] == r,
          lambda: f"lora_linear: `lora_B` must have shape ({N}, {r}) to match `weight` and `lora_A`, "
                  f"got {tuple(lora_B.shape)}")
    if bias is not None:
        check(isinstance(bias, torch.Tensor) and bias.is_floating_point(),
              "lora_linear: `bias` must be a floating-point tensor or None")
        check(bias.dim() == 1 and bias.shape[0] == N,
              lambda: f"lora_linear: `bias` must have shape ({N},), got {tuple(bias.shape)}")
    check(x.dtype == weight.dtype, lambda: f"lora_linear: `x` is {x.dtype} but `weight` is {weight.dtype}; cast one "
                                           "of them or run under torch.autocast")
    device = x.device
    if not (weight.device == device and lora_A.device == device and lora_B.device == device
            and (bias is None or bias.device == device)):
        devices = {t.device for t in (x, weight, lora_A, lora_B) + ((bias,) if bias is not None else ())}
        raise ValueError(f"lora_linear: all tensors must be on one device, got {sorted(map(str, devices))}")
    # messages built only on failure: dynamo cannot format a float while it traces with dynamic=True
    if not (isinstance(scaling, (int, float)) and not isinstance(scaling, bool) and finite(scaling)):
        raise ValueError(f"lora_linear: `scaling` must be a finite number (not a bool), got {scaling!r}")
    if not (isinstance(dropout_p, (int, float)) and 0.0 <= dropout_p < 1.0):
        raise ValueError(f"lora_linear: `dropout_p` must be in [0, 1), got {dropout_p!r}")


def stacked_adapters(lora_A, lora_B, scaling, names) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(A, B, s) of several active peft adapters as one LoRA of summed rank (lora_A/lora_B: peft's ModuleDicts,
    scaling its dict): the A's stacked, the B's stacked in their widest dtype (an fp32 adapter beside a bf16 one
    keeps its precision, whichever is listed first), each times s_i / s, and s the largest scaling, left to the op
    as one adapter's is (split_scaling): all of a small s folded into fp16 B's put them into subnormals (dA 10×
    peft's error at alpha/r = 1/64). Adapters of one alpha/r: B's unscaled. Scalings held as tensors (peft's
    hotswap) are folded in whole, s = 1. Without dropout only: peft draws a mask per adapter, one fused op would
    draw one for all."""
    dtype = functools.reduce(torch.promote_types, [lora_A[n].weight.dtype for n in names])
    A = torch.cat([lora_A[n].weight.to(dtype) for n in names], dim=0)
    scales = [scaling[n] for n in names]
    folded = any(isinstance(v, torch.Tensor) for v in scales) or not any(scales)  # (tensors: no value read)
    common = 1.0 if folded else max(scales, key=abs)
    B = torch.cat([lora_B[n].weight.to(dtype) * (v / common) if folded or v != common else lora_B[n].weight.to(dtype)
                   for n, v in zip(names, scales)], dim=1)
    return A, B, float(common)


def split_scaling(scaling: float, dtype: torch.dtype) -> tuple[float, float]:
    """(a, b) with a·b = s: where the LoRA scaling goes in the fused kernels, a into the stored rank intermediate
    xs = a·(keep∘x)·Aᵀ/(1-p), b into B_p = b·B (rank_operands); the backward stores g' = a·dy·B and applies b to
    A in the dx tail (b·A) and to the fp32 dA and dB sums. bf16 and fp32: a = s, b = 1 (nothing to split).
    In fp16, b is a power of two and |a| ≤ 1 s's mantissa (0.5 ≤ |a| ≤ 1 down to |s| = 2^_MIN_B_EXP):
    - s > 1: with all of s in xs (and in g), fp16 overflowed once |x·Aᵀ|·s > 65504 (|dy·B|·s at a loss scale 4-8×
      below peft's fp32 rank path, alpha/r = 16) although the LoRA term and y were in range;
    - s < 1: with all of s in xs and g, they fell into fp16's subnormals (< 6.1e-5) 1/s times sooner than peft's
      x·Aᵀ and dy·B: dB was 2e-3 off fp64 at s = 1/64 and |x| ~ 1e-3, dA 5e-3 at s = 0.05 and dy ~ 1e-4.
    A power of two scales exactly, so nothing is rounded more than before, except that b·B and b·A (b < 1) round
    elements below 2^-14/b into subnormals: those are the small terms of the forward's LoRA tail and the dx tail,
    each far below the fp16 rounding of y and dx. Limit for b > 1: b·A must fit fp16, |A| < 65504/b (4096 at
    alpha/r = 16; LoRA's A starts near 1/√K); a larger A gives an inf dx, which GradScaler skips. b is at most
    2^_MAX_B_EXP: past |s| = 256, |a| > 1 holds the rest."""
    if dtype != torch.float16 or scaling == 0.0:
        return scaling, 1.0
    m, e = math.frexp(scaling)  # s = m·2^e, 0.5 <= |m| < 1
    if abs(m) == 0.5:  # s = ±2^(e-1): all of it into b
        m, e = 2.0 * m, e - 1
    if e < _MIN_B_EXP:  # b·B and b·A would round most of their elements into subnormals: the rest stays in a
        m, e = math.ldexp(m, e - _MIN_B_EXP), _MIN_B_EXP
    elif e > _MAX_B_EXP:  # b·B (forward) and b·A (dx tail) would overflow at |B|, |A| ~ 1: the rest goes into a
        m, e = math.ldexp(m, e - _MAX_B_EXP), _MAX_B_EXP
    return m, math.ldexp(1.0, e)


# The smallest exponent of split_scaling's b: b·A stays in fp16's normal range for |A| ≥ 2^-14/b = 0.016 (LoRA's
# initial A is U(±1/√K), 1/√K = 0.016 at K = 4096).
_MIN_B_EXP = -8
# The largest: b·B and b·A fit fp16 for |B|, |A| < 65504/b = 256. Without it s = 40000 put b = 2^16 into B_p = b·B,
# inf at |B| = 1 (the torch backend: 24.0). Above |s| = 2^8, a = s/2^8 takes the rest: xs = a·x·Aᵀ and g' = a·dy·B
# must then fit fp16 (|x·Aᵀ|, |dy·B| < 65504/|a|), as all of s in them did before the split.
_MAX_B_EXP = 8


def rank_operands(x, lora_A, lora_B, scaling):
    """(x2, A_p, B_p): x as rows and the rank-padded factors in x's dtype, B_p = b·B with b split_scaling's power of
    two (the factors themselves when nothing changes). Not cached across calls: torch.optim.AdamW(fused=True)
    (torch 2.13) and writes through .data update parameters in place without bumping their _version, so no cheap
    key says a cached copy is stale (tests/test_lora_fold.py)."""
    x2, A_p, B_pad = _padded_factors(x, lora_A, lora_B)
    b_scale = split_scaling(scaling, x.dtype)[1]
    return x2, A_p, B_pad if b_scale == 1.0 else B_pad * b_scale


def _padded_factors(x, lora_A, lora_B) -> tuple:
    """(x2, A_p, B_pad): x as rows and A, B rank-padded in x's dtype (themselves when nothing is padded or cast)."""
    from fastft.kernels.rank_ops import rank_pad

    K = x.shape[-1]
    N, r = lora_B.shape
    R = rank_pad(r)
    return as_rows(x), padded(lora_A, R, K, x.dtype), padded(lora_B, N, R, x.dtype)


def saved_factors(saved, lora_A, lora_B) -> tuple:
    """What the eager doors save of fused_lora_forward's `saved` (x2, A_p, B_p, xs): (x2, lora_A, lora_B, xs), the
    factors themselves rather than their padded/cast copies, which would stay alive per call until backward. Saved
    through ctx.save_for_backward, so an in-place change of A or B before backward is refused (version check)."""
    return saved[0], lora_A, lora_B, saved[3]


def backward_operands(x2, lora_A, lora_B, xs) -> tuple:
    """fused_lora_backward's `saved` (x2, A_p, B_g, xs) from what saved_factors kept: A_p rebuilt as the forward
    built it, and B itself (rank-padded, in x's dtype), not the forward's B_p = b·B: the backward's g' = a·dy·B
    reads B, where b·B with b < 1 would have rounded small B into fp16's subnormals (the factors themselves when
    nothing is padded or cast)."""
    return (*_padded_factors(x2, lora_A, lora_B), xs)


def lora_meta(x, bias, lora_A, lora_B, scaling, dropout_p, seed) -> tuple:
    """What fused_lora_backward needs besides the saved tensors: Python metadata of the call."""
    return (x.shape, scaling, dropout_p, seed, None if bias is None else bias.dtype,
            lora_B.shape[1], lora_A.dtype, lora_B.dtype)


def fused_lora_forward(x, bias, lora_A, lora_B, scaling, dropout_p, base_gemm, fold_gemm=None, seed=None):
    """The forward every fused LoRA op shares: xs = a·(keep∘x)·Aᵀ/(1-p), then `base_gemm(x2, xs, B_p, bias)`, the
    op's base GEMM with the rank tail xs·B_pᵀ, B_p = b·B (a·b = s: split_scaling, rank_operands; dense W for
    lora_linear, NF4 W for qlora_linear).
    Returns (y, saved, meta): y as rows (M, N), not a view in x's shape (see `rows_to`); saved = (x2, A_p, B_p,
    xs) and meta (lora_meta) are what fused_lora_backward takes.
    The doors keep x2, xs and the factors themselves for backward, not A_p/B_p (parameter-sized copies wherever the
    rank is padded or the dtype cast), and redo rank_operands there: saved_factors / backward_operands.

    fold_gemm(x2, A_p, B_p, bias, a) -> (y, xs), when given: the GEMM that computes xs in its own K loop
    (fastft.ops.lora_path's fold path), used instead of the skinny pass + base_gemm when there is no dropout.
    seed: the dropout seed when the caller drew it (the traced door), else drawn here."""
    from fastft.kernels import rank_ops

    if seed is None:
        seed = shared.draw_seed() if dropout_p > 0.0 else 0
    meta = lora_meta(x, bias, lora_A, lora_B, scaling, dropout_p, seed)
    x2, A_p, B_p = rank_operands(x, lora_A, lora_B, scaling)
    xs_scale = split_scaling(scaling, x.dtype)[0] / (1.0 - dropout_p)
    if fold_gemm is not None and dropout_p == 0.0:
        y, xs = fold_gemm(x2, A_p, B_p, bias, xs_scale)
    else:
        xs = rank_ops.rank_project(x2, A_p, scale=xs_scale, p_drop=dropout_p, seed=seed)
        y = base_gemm(x2, xs, B_p, bias)
    return y, (x2, A_p, B_p, xs), meta


def fused_lora_backward(saved, meta, dy, dx_gemm, need_x, need_b, need_A, need_B, dx_fold_gemm=None):
    """(x2, dy2, dx, db, dA, dB) from dy, with backward_operands' `saved` (x2, A_p, B_g = B, xs) and `meta`;
    `dx_gemm(dy2, g, b·A_p, p_drop, seed, leave_room)` is the op's dx GEMM with the tail (leave_room: see
    fastft.ops.overlap). With split_scaling's (a, b):
    g' = a·dy·B/(1-p) is stored, the dx tail's factor is b·A_p (g'·b·A = s·dy·B·A/(1-p)), dA = b·g'ᵀ·(keep∘x) and
    dB = b·dyᵀ·xs, b applied to the fp32 sums.

    dx_fold_gemm(dy2, B_g, b·A_p, g_scale, p_drop, seed) -> (dx, g), when given: the dx GEMM that computes g in its
    own loop over dy (the fold path), used instead of the skinny pass + dx_gemm when dx is needed. dA and dB
    come from one launch (rank_reduce_pair) when both are needed."""
    from fastft.kernels import rank_ops

    x2, A_p, B_g, xs = saved
    x_shape, scaling, dropout_p, seed, bias_dtype, r, A_dtype, B_dtype = meta
    g_scale, b = split_scaling(scaling, x2.dtype)
    g_scale /= 1.0 - dropout_p
    N = B_g.shape[0]
    dtype = x2.dtype
    dy2 = to_dtype(dy.reshape(x2.shape[0], N), dtype)  # not (-1, N): N may be 0
    if not dy2.is_contiguous():
        dy2 = dy2.contiguous()
    dx = db = g = None
    if need_x and dx_fold_gemm is not None:
        dx, g = dx_fold_gemm(dy2, B_g, tail_factor(A_p, b), g_scale, dropout_p, seed)
        dx = dx.view(*x_shape)
    elif need_x or need_A:
        g = rank_ops.rank_project(dy2, B_g.t(), scale=g_scale)
    # dA and dB do not wait for the dx GEMM: with FASTFT_LORA_OVERLAP=1 they run on a side stream beside it
    # (fastft.ops.overlap; the same results), launched after it, in the room its configs leave on each SM
    side = overlap.fork(dy2.device, A_p.shape[0]) if need_x and dx is None and (need_A or need_B) else None
    room = side is not None
    if need_x and dx is None:
        dx = dx_gemm(dy2, g, tail_factor(A_p, b), dropout_p, seed, room).view(*x_shape)
    with overlap.on(side):
        dA, dB = rank_gradients(g, x2, xs, dy2, b, r, A_dtype, B_dtype, need_A, need_B, dropout_p, seed,
                                beside_gemm=room)
    overlap.join(side, read=(g, x2, xs, dy2), made=(dA, dB))
    if need_b and bias_dtype is not None:
        db = dy2.sum(0, dtype=torch.float32).to(bias_dtype)
    return x2, dy2, dx, db, dA, dB


def rank_gradients(g, x2, xs, dy2, b: float, r: int, A_dtype, B_dtype, need_A: bool, need_B: bool, dropout_p: float,
                   seed: int, *, beside_gemm: bool = False) -> tuple:
    """(dA, dB) of fused_lora_backward, None where not needed: dA = b·gᵀ·(keep∘x) in A's dtype, dB = b·dyᵀ·xs in B's
    own (N, r) layout and dtype (a copy only where the rank was padded: autograd then accumulates it as it is); both
    from one launch (rank_reduce_pair) when both are needed. beside_gemm: they run beside the dx GEMM (overlap)."""
    from fastft.kernels import rank_ops

    dA = dB = None
    if need_A and need_B:
        dA, dB = rank_ops.rank_reduce_pair(g, x2, xs, dy2, p_drop=dropout_p, seed=seed, beside_gemm=beside_gemm)
        dA, dB = to_dtype(times_b(_unpadded(dA, r), b), A_dtype), dB if dB.shape[1] == r else dB[:, :r]
    elif need_A:
        dA = rank_ops.rank_reduce(g, x2, p_drop=dropout_p, seed=seed, beside_gemm=beside_gemm)
        dA = to_dtype(times_b(_unpadded(dA, r), b), A_dtype)
    if need_B and dB is None:
        dB = _unpadded(rank_ops.rank_reduce(xs, dy2, beside_gemm=beside_gemm), r).t()
    if need_B:
        if b != 1.0:
            dB = dB.mul_(b)  # the fp32 sum is this call's own buffer
        dB = padded(dB, *dB.shape, B_dtype)
    return dA, dB


def tail_factor(A_p: torch.Tensor, b: float) -> torch.Tensor:
    """The dx tail's factor b·A_p (split_scaling's b; A_p itself when b = 1), made only where dx is computed."""
    return A_p if b == 1.0 else A_p * b


def times_b(total: torch.Tensor, b: float) -> torch.Tensor:
    """b·total for an fp32 sum that is this call's own buffer (split_scaling's b)."""
    return total if b == 1.0 else total.mul_(b)


def _unpadded(t: torch.Tensor, r: int) -> torch.Tensor:
    """The first r rows of a rank-padded result (t itself when nothing was padded: a slice costs host time)."""
    return t if t.shape[0] == r else t[:r]


def _fold_paths(x, weight, lora_A, dropout_p) -> tuple[bool, bool]:
    """Whether the forward and the backward of this call take the fold path (fastft.ops.lora_path)."""
    from fastft.kernels.rank_ops import rank_pad

    N, K = weight.shape
    M, R = x.numel() // K, rank_pad(lora_A.shape[0])
    dropout = dropout_p > 0.0
    return (lora_path.choose("forward", M, K, N, R, x.dtype, dropout=dropout) == "fold",
            lora_path.choose("backward", M, K, N, R, x.dtype, dropout=dropout) == "fold")


def lora_forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed=None):
    """Both doors' forward (fastft.ops.compiled): (y, saved, meta, fold_backward), the split/fold path chosen
    here per direction (fastft.ops.lora_path); seed as fused_lora_forward."""
    from fastft.kernels.lora_gemm import lora_gemm, lora_gemm_folded

    fold_fwd, fold_backward = _fold_paths(x, weight, lora_A, dropout_p)
    y, saved, meta = fused_lora_forward(
        x, bias, lora_A, lora_B, scaling, dropout_p,
        lambda x2, xs, B_p, b: lora_gemm(x2, weight, xs, B_p, b, b_nk=True),
        fold_gemm=(lambda x2, A_p, B_p, b, scale: lora_gemm_folded(x2, weight, A_p, B_p, b, b_nk=True,
                                                                   scale=scale)) if fold_fwd else None, seed=seed)
    return y, saved, meta, fold_backward


def lora_backward(saved, meta, fold_backward, weight, dy, need_x, need_w, need_b, need_A, need_B):
    """Both doors' backward: (dx, dW, db, dA, dB), None where not needed."""
    from fastft.kernels.lora_gemm import lora_gemm, lora_gemm_folded

    x2, dy2, dx, db, dA, dB = fused_lora_backward(
        saved, meta, dy, lambda dy2, g, A_p, p, seed, room: lora_gemm(dy2, weight, g, A_p, None, b_nk=False,
                                                                      p_drop=p, seed=seed, leave_room=room),
        need_x, need_b, need_A, need_B,
        dx_fold_gemm=(lambda dy2, B_p, A_p, scale, p, seed: lora_gemm_folded(
            dy2, weight, B_p, A_p, None, b_nk=False, scale=scale, p_drop=p, seed=seed))
        if fold_backward else None)
    dW = (dy2.t() @ x2).to(weight.dtype) if need_w else None
    return dx, dW, db, dA, dB


class LoRALinearFunction(torch.autograd.Function):
    """The eager door (fastft.ops.compiled)."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling, dropout_p):
        refuse_replayed_dropout("lora_linear", dropout_p, x.device)  # the seed is drawn on the host below
        y, saved, ctx.meta, ctx.fold_backward = lora_forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p)
        # W only where dx or dW reads it: under autocast it is a cast copy (N×K) that would otherwise stay alive
        ctx.save_for_backward(*saved_factors(saved, lora_A, lora_B),
                              weight if ctx.needs_input_grad[0] or ctx.needs_input_grad[1] else None)
        return y

    @staticmethod
    @first_order_only
    def backward(ctx, dy):
        x2, lora_A, lora_B, xs, weight = ctx.saved_tensors
        saved = backward_operands(x2, lora_A, lora_B, xs)
        return (*lora_backward(saved, ctx.meta, ctx.fold_backward, weight, dy, *ctx.needs_input_grad[:5]),
                None, None)


# The traced door (fastft.ops.compiled): fastft::draw_seed (compiled_args), then fastft::lora_linear and its backward
# as custom ops, the seed an input of both (checkpoint-safe, see compiled_args). The rank-padded factors are padded
# again in backward from the inputs (a custom op cannot return its inputs).
def _lora_linear_body(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], lora_A: torch.Tensor,
                      lora_B: torch.Tensor, seed: Optional[torch.Tensor], scaling: float, dropout_p: float
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    seed = seed_int("lora_linear", seed, dropout_p, x.device)
    y, saved, _, _ = lora_forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed)
    return rows_to(y, x), saved[3]


def _lora_linear_fake(x, weight, bias, lora_A, lora_B, seed, scaling, dropout_p):
    from fastft.kernels.rank_ops import rank_pad

    M = x.numel() // x.shape[-1]
    return x.new_empty((*x.shape[:-1], weight.shape[0])), x.new_empty((M, rank_pad(lora_A.shape[0])))


def _lora_linear_backward_body(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                               lora_A: torch.Tensor, lora_B: torch.Tensor, xs: torch.Tensor,
                               seed: Optional[torch.Tensor], scaling: float, dropout_p: float, need_x: bool,
                               need_w: bool, need_b: bool, need_A: bool, need_B: bool
                               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    fold_backward = _fold_paths(x, weight, lora_A, dropout_p)[1]  # as the forward chose it
    saved = backward_operands(x, lora_A, lora_B, xs)
    meta = lora_meta(x, bias, lora_A, lora_B, scaling, dropout_p, seed_int("lora_linear", seed, dropout_p, x.device))
    grads = lora_backward(saved, meta, fold_backward, weight, dy, need_x, need_w, need_b, need_A, need_B)
    return tuple(g if g is not None else unused(like) for g, like in zip(grads, (x, weight, dy, lora_A, lora_B)))


def _lora_linear_backward_fake(dy, x, weight, bias, lora_A, lora_B, xs, seed, scaling, dropout_p, need_x, need_w,
                               need_b, need_A, need_B):
    dB = lora_B.new_empty(lora_B.shape) if need_B else unused(lora_B)
    db = bias.new_empty(bias.shape) if need_b and bias is not None else unused(dy)
    return fresh_like(x, need_x), fresh_like(weight, need_w), db, fresh_like(lora_A, need_A), dB


# fastft::lora_linear_backward(_dropout): compiled_args.seeded_ops
LORA_LINEAR_BACKWARD_OPS = seeded_ops("lora_linear_backward", _lora_linear_backward_body, _lora_linear_backward_fake)


def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_A, lora_B, seed, scaling, dropout_p = inputs
    ctx.save_for_backward(x, weight, bias, lora_A, lora_B, output[1], seed)
    ctx.meta = (scaling, dropout_p)


def _backward_op(ctx, dy, _dxs):
    x, weight, bias, lora_A, lora_B, xs, seed = ctx.saved_tensors
    needs = ctx.needs_input_grad[:5]
    needs = (needs[0], needs[1], needs[2] and bias is not None, needs[3], needs[4])
    backward_op = LORA_LINEAR_BACKWARD_OPS[ctx.meta[1] > 0.0]
    grads = backward_op(dy, x, weight, bias, lora_A, lora_B, xs, seed, *ctx.meta, *needs)
    return (*(needed(g, n) for g, n in zip(grads, needs)), None, None, None)


# fastft::lora_linear and fastft::lora_linear_dropout
LORA_LINEAR_OPS = seeded_ops("lora_linear", _lora_linear_body, _lora_linear_fake, _backward_op, _setup_context)
lora_linear_op, lora_linear_backward_op = LORA_LINEAR_OPS[False], LORA_LINEAR_BACKWARD_OPS[False]


def lora_linear(x, weight, bias, lora_A, lora_B, scaling, dropout_p=0.0, *, backend="auto"):
    """y = x·Wᵀ + b + s·(dropout(x)·Aᵀ)·Bᵀ with W (N×K) frozen, A (r×K) and B (N×r).

    x: (..., K). weight and x share a dtype (fp16/bf16/fp32; the torch backend also takes fp64), or run under
    torch.autocast. lora_A/lora_B may be kept in another float dtype (e.g. fp32 masters), and the bias too: the
    product is computed in x's dtype and their gradients come back in their own dtype. dropout_p applies
    inverted dropout to the LoRA input only (pass 0 in eval).
    backend: "auto" (Triton on CUDA, torch elsewhere), "triton" or "torch". On the Triton backend the rank-R
    products run split (skinny passes) or folded into the GEMMs' own loops, per shape: fastft.ops.lora_path
    (FASTFT_LORA_PATH=split|fold|auto).
    """
    check_backend("lora_linear", backend)
    x, weight = autocast_inputs(x, weight)
    validate_lora_linear_args(x, weight, bias, lora_A, lora_B, scaling, dropout_p)
    scaling, dropout_p = float(scaling), float(dropout_p)
    backend = resolve_backend("lora_linear", backend, x.device, arg="x", dtype=x.dtype)
    if backend == "torch" or x.numel() == 0 or weight.shape[0] == 0:  # empty y: nothing for the kernels to do
        return lora_linear_reference(x, weight, bias, lora_A, lora_B, scaling, dropout_p)
    with autocast_off(x.device.type):
        if not compiling():
            return rows_to(LoRALinearFunction.apply(x, weight, bias, lora_A, lora_B, scaling, dropout_p), x)
        seed = traced_seed(x, lora_A, dropout_p)
        return LORA_LINEAR_OPS[dropout_p > 0.0](x, weight, bias, lora_A, lora_B, seed, scaling, dropout_p)[0]
