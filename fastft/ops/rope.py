"""Rotary position embedding of q and k together (transformers' rotate_half layout), in place or not.

- `rope_(q, k, cos, sin)` rotates q and k in place and returns them (autograd: a Function that marks them
  dirty; the backward applies the inverse rotation to the incoming gradients). Views that need a gradient
  go out of place and are copied back (see `rope_`); torch forbids mutating a view a custom Function
  returned (e.g. the output of a fused LoRA projection) and says so, so inside models `rope` is the choice.
- `rope(q, k, cos, sin)` writes new tensors with q's and k's strides (one kernel, same traffic).
- `rope_cos_sin(position_ids, inv_freq, attention_scaling, dtype)` builds (B, S, D) cos/sin from positions the
  way transformers' rotary embedding does (packed rows whose positions restart need nothing special).

cos/sin: (B, S, D) or (1, S, D), as transformers' rotary embedding returns them. q: (B, HQ, S, D) and
k: (B, HK, S, D) with unsqueeze_dim=1 (transformers' attention layout), or (B, S, H, D) with unsqueeze_dim=2.
Computed in fp32 and rounded once (transformers rounds q·cos and rotate_half(q)·sin separately).
cos/sin take no gradient (transformers computes them under no_grad); inputs needing one use the reference.
"""
from __future__ import annotations

import torch

from fastft.ops.compiled import compiling
from fastft.ops.shared import (autocast_off, check, check_tensor, finite, first_order_only, resolve_backend,
                               to_dtype)


def rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def rope_reference(q, k, cos, sin, *, unsqueeze_dim=1):
    """transformers' apply_rotary_pos_emb, the results in q's and k's dtypes (as the kernel gives them: with fp32
    tables for bf16 q/k, type promotion alone would return fp32 here and bf16 on Triton)."""
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    return to_dtype(q * cos + rotate_half(q) * sin, q.dtype), to_dtype(k * cos + rotate_half(k) * sin, k.dtype)


def rope_cos_sin(position_ids, inv_freq, attention_scaling=1.0, dtype=torch.float32):
    """(cos, sin) of shape (B, S, D) for integer positions (B, S) and inverse frequencies (D/2,), in fp32 then
    cast to dtype, as transformers' rotary embedding computes them."""
    check(isinstance(position_ids, torch.Tensor) and position_ids.dim() == 2 and not position_ids.is_floating_point(),
          "rope_cos_sin: `position_ids` must be an integer tensor of shape (batch, seq)")
    check_tensor("rope_cos_sin", "inv_freq", inv_freq)
    check(inv_freq.dim() == 1,
          lambda: f"rope_cos_sin: `inv_freq` must be 1-D (head_dim/2,), got {tuple(inv_freq.shape)}")
    check(isinstance(attention_scaling, (int, float)) and not isinstance(attention_scaling, bool)
          and finite(attention_scaling) and attention_scaling > 0,
          lambda: "rope_cos_sin: `attention_scaling` must be a finite positive number (the rotary embedding's "
                  f"attention_scaling, 1.0 for most rope types), got {attention_scaling!r}")
    freqs = position_ids.float()[..., None] * inv_freq.float().to(position_ids.device)[None, None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * attention_scaling).to(dtype), (emb.sin() * attention_scaling).to(dtype)


def _launch(q, k, cos, sin, q_out, k_out, unsqueeze_dim, inverse):
    from fastft.kernels.rope import rope_rotate, table_strides

    if table_strides(cos) != table_strides(sin):  # the kernel reads both tables with one set of strides
        B, S = (q.shape[0], q.shape[2]) if unsqueeze_dim == 1 else q.shape[:2]
        cos, sin = cos.expand(B, S, cos.shape[-1]).contiguous(), sin.expand(B, S, sin.shape[-1]).contiguous()
    rope_rotate(q, k, cos, sin, q_out, k_out, inverse=inverse, heads_first=unsqueeze_dim == 1)


def _rotate(q, k, cos, sin, unsqueeze_dim, inverse):
    """The rotation (inverse: its transpose, the backward) of q and k into new tensors with their strides."""
    q_out, k_out = torch.empty_like(q), torch.empty_like(k)
    _launch(q, k, cos, sin, q_out, k_out, unsqueeze_dim, inverse=inverse)
    return q_out, k_out


def _rotate_in_place(q, k, cos, sin, unsqueeze_dim):
    """q and k rotated in place, no autograd. The kernel rotates q in place and then k, so where they share memory
    (rope_(t, t)) it would rotate the shared elements twice: then out of place and copied back, each once."""
    if _may_share_memory(q, k):
        q_new, k_new = _rotate(q, k, cos, sin, unsqueeze_dim, inverse=False)
        q.copy_(q_new)
        k.copy_(k_new)
    else:
        _launch(q, k, cos, sin, q, k, unsqueeze_dim, inverse=False)


def _may_share_memory(q, k) -> bool:
    """Whether q and k may hold common elements: their byte ranges intersect (q is k, or views of one buffer). Also
    True for views that interleave without sharing (a fused qkv projection's q and k): they are then rotated out of
    place, exact either way."""
    if q.untyped_storage().data_ptr() != k.untyped_storage().data_ptr() or q.numel() == 0 or k.numel() == 0:
        return False  # (separate buffers, the common case: the cheapest test first)
    q0, k0 = q.data_ptr(), k.data_ptr()
    q1 = q0 + sum((n - 1) * st for n, st in zip(q.shape, q.stride())) * q.element_size()
    k1 = k0 + sum((n - 1) * st for n, st in zip(k.shape, k.stride())) * k.element_size()
    return q0 <= k1 and k0 <= q1


def _inverse(ctx, dq, dk):
    cos, sin = ctx.saved_tensors
    return _rotate(dq, dk, cos, sin, ctx.unsqueeze_dim, inverse=True)


class RoPEFunction(torch.autograd.Function):
    """The eager door (fastft.ops.compiled)."""

    @staticmethod
    def forward(ctx, q, k, cos, sin, unsqueeze_dim):
        ctx.save_for_backward(cos, sin)
        ctx.unsqueeze_dim = unsqueeze_dim
        return _rotate(q, k, cos, sin, unsqueeze_dim, inverse=False)

    @staticmethod
    @first_order_only
    def backward(ctx, dq, dk):
        return (*_inverse(ctx, dq, dk), None, None, None)


class RoPEInplaceFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin, unsqueeze_dim):
        _launch(q, k, cos, sin, q, k, unsqueeze_dim, inverse=False)
        ctx.mark_dirty(q, k)
        ctx.save_for_backward(cos, sin)
        ctx.unsqueeze_dim = unsqueeze_dim
        return q, k

    @staticmethod
    @first_order_only
    def backward(ctx, dq, dk):
        return (*_inverse(ctx, dq, dk), None, None, None)


# The traced door (fastft.ops.compiled): fastft::rope and fastft::rope_backward (the inverse rotation), and
# fastft::rope_, the in-place rotation for calls that record no autograd. torch refuses register_autograd on an op
# that mutates its inputs, so `rope_` under autograd traces as fastft::rope plus q.copy_/k.copy_ (autograd records
# the copies on the views, as it does for the eager out-of-place fallback).
@torch.library.custom_op("fastft::rope", mutates_args=())
def rope_op(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
            unsqueeze_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    return _rotate(q, k, cos, sin, unsqueeze_dim, inverse=False)


@rope_op.register_fake
def _(q, k, cos, sin, unsqueeze_dim):
    return torch.empty_like(q), torch.empty_like(k)


@torch.library.custom_op("fastft::rope_backward", mutates_args=())
def rope_backward_op(dq: torch.Tensor, dk: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     unsqueeze_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    return _rotate(dq, dk, cos, sin, unsqueeze_dim, inverse=True)


@rope_backward_op.register_fake
def _(dq, dk, cos, sin, unsqueeze_dim):
    return torch.empty_like(dq), torch.empty_like(dk)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(inputs[2], inputs[3])
    ctx.unsqueeze_dim = inputs[4]


def _backward_op(ctx, dq, dk):
    cos, sin = ctx.saved_tensors
    return (*rope_backward_op(dq, dk, cos, sin, ctx.unsqueeze_dim), None, None, None)


rope_op.register_autograd(_backward_op, setup_context=_setup_context)


@torch.library.custom_op("fastft::rope_", mutates_args=("q", "k"))
def rope_inplace_op(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                    unsqueeze_dim: int) -> None:
    _rotate_in_place(q, k, cos, sin, unsqueeze_dim)


@rope_inplace_op.register_fake
def _(q, k, cos, sin, unsqueeze_dim):
    return None


def validate_rope_args(q, k, cos, sin, unsqueeze_dim, op="rope") -> None:
    for name, t in (("q", q), ("k", k), ("cos", cos), ("sin", sin)):
        check_tensor(op, name, t)
    if unsqueeze_dim not in (1, 2):  # (the message only on failure: traced with dynamic=True, an int is symbolic)
        raise ValueError(f"{op}: `unsqueeze_dim` must be 1 (q is (B, H, S, D)) or 2 (q is (B, S, H, D)), got "
                         f"{unsqueeze_dim!r}")
    check(q.dim() == 4 and k.dim() == 4, lambda: f"{op}: `q` and `k` must be 4-D, got shapes {tuple(q.shape)} and "
                                                 f"{tuple(k.shape)}")
    seq_dim = 2 if unsqueeze_dim == 1 else 1
    B, S, D = q.shape[0], q.shape[seq_dim], q.shape[-1]
    check(D % 2 == 0, lambda: f"{op}: the head dimension must be even (rotate_half splits it), got {D}")
    check(k.shape[0] == B and k.shape[seq_dim] == S and k.shape[-1] == D,
          lambda: f"{op}: `k` {tuple(k.shape)} must match `q` {tuple(q.shape)} in batch, sequence and head_dim")
    for name, t in (("cos", cos), ("sin", sin)):
        check(t.dim() == 3 and t.shape[0] in (1, B) and t.shape[1] == S and t.shape[2] == D,
              lambda: f"{op}: `{name}` must have shape ({B} or 1, {S}, {D}), got {tuple(t.shape)}")
        check(t.device == q.device, lambda: f"{op}: `{name}` is on {t.device} but `q` is on {q.device}")
    check(q.dtype == k.dtype, lambda: f"{op}: `q` is {q.dtype} but `k` is {k.dtype}")
    check(k.device == q.device, lambda: f"{op}: `k` is on {k.device} but `q` is on {q.device}")


def _cos_sin(position_ids, cos, sin, inv_freq, attention_scaling, q, unsqueeze_dim, op):
    if position_ids is None:
        check(cos is not None and sin is not None,
              lambda: f"{op}: give `cos` and `sin`, or `position_ids` and `inv_freq`")
        return cos, sin
    check(cos is None and sin is None, lambda: f"{op}: give either `cos`/`sin` or `position_ids`, not both")
    check(inv_freq is not None,
          lambda: f"{op}: `position_ids` needs `inv_freq` (the rotary embedding's inverse frequencies)")
    check_tensor(op, "q", q)  # (validated before its dtype is read for the tables)
    cos, sin = rope_cos_sin(position_ids, inv_freq, attention_scaling, q.dtype)
    if q.dim() == 4 and unsqueeze_dim in (1, 2):  # else validate_rope_args says what is wrong with them
        B, S, D = q.shape[0], q.shape[2 if unsqueeze_dim == 1 else 1], q.shape[-1]
        check(cos.shape[0] in (1, B) and cos.shape[1] == S and cos.shape[2] == D,
              lambda: f"{op}: `position_ids` {tuple(position_ids.shape)} and `inv_freq` {tuple(inv_freq.shape)} must "
                      f"be ({B if B == 1 else f'{B} or 1'}, {S}) and ({D // 2},) for `q` {tuple(q.shape)}")
    return cos, sin


def rope(q, k, cos=None, sin=None, *, position_ids=None, inv_freq=None, attention_scaling=1.0, unsqueeze_dim=1,
         backend="auto"):
    """(q·cos + rotate_half(q)·sin, k·cos + rotate_half(k)·sin) as new tensors; see the module docstring."""
    cos, sin = _cos_sin(position_ids, cos, sin, inv_freq, attention_scaling, q, unsqueeze_dim, "rope")
    validate_rope_args(q, k, cos, sin, unsqueeze_dim)
    backend = resolve_backend("rope", backend, q.device, arg="q", dtype=q.dtype)
    if backend == "torch" or q.numel() == 0 or cos.requires_grad or sin.requires_grad:
        return rope_reference(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim)
    with autocast_off(q.device.type):
        if compiling():
            return rope_op(q, k, cos, sin, unsqueeze_dim)
        return RoPEFunction.apply(q, k, cos, sin, unsqueeze_dim)


def rope_(q, k, cos=None, sin=None, *, position_ids=None, inv_freq=None, attention_scaling=1.0, unsqueeze_dim=1,
          backend="auto"):
    """`rope` written into q and k themselves; returns (q, k).

    Autograd lets a Function mutate views only when it returns a single tensor, so when q or k is a view
    (transformers' transposed projections) and needs a gradient, the rotation is computed out of place and
    copied back (torch then records the in-place update of the view itself). Plain tensors, or no gradient:
    one kernel, truly in place. q and k that share memory (rope_(t, t)) are also rotated out of place and copied
    back, so each element is rotated once. Under torch.compile: fastft::rope_ without autograd, fastft::rope and the
    copies with it.
    """
    cos, sin = _cos_sin(position_ids, cos, sin, inv_freq, attention_scaling, q, unsqueeze_dim, "rope_")
    validate_rope_args(q, k, cos, sin, unsqueeze_dim, op="rope_")
    if not compiling():  # a tensor whose positions share memory (e.g. expanded) has no one right rotation
        for name, t in (("q", q), ("k", k)):
            check(torch._debug_has_internal_overlap(t) != 1,
                  lambda: f"rope_: `{name}` has elements that share memory (strides {t.stride()}, e.g. expanded), "
                          "which an in-place rotation cannot write; pass a contiguous copy, or use rope")
    backend = resolve_backend("rope_", backend, q.device, arg="q", dtype=q.dtype)
    if backend == "torch" or q.numel() == 0 or cos.requires_grad or sin.requires_grad:
        q_new, k_new = rope_reference(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim)
        return q.copy_(q_new), k.copy_(k_new)
    with autocast_off(q.device.type):
        if not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad)):
            if compiling():
                rope_inplace_op(q, k, cos, sin, unsqueeze_dim)
            else:
                _rotate_in_place(q, k, cos, sin, unsqueeze_dim)
            return q, k
        if compiling():  # fastft::rope_ cannot carry autograd (see rope_inplace_op)
            q_new, k_new = rope_op(q, k, cos, sin, unsqueeze_dim)
            return q.copy_(q_new), k.copy_(k_new)
        if q._is_view() or k._is_view() or _may_share_memory(q, k):  # (sharing memory: see _rotate_in_place)
            q_new, k_new = RoPEFunction.apply(q, k, cos, sin, unsqueeze_dim)
            return q.copy_(q_new), k.copy_(k_new)
        return RoPEInplaceFunction.apply(q, k, cos, sin, unsqueeze_dim)
