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

from fastft.ops.shared import check, check_tensor, resolve_backend


def rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def rope_reference(q, k, cos, sin, *, unsqueeze_dim=1):
    """transformers' apply_rotary_pos_emb."""
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def rope_cos_sin(position_ids, inv_freq, attention_scaling=1.0, dtype=torch.float32):
    """(cos, sin) of shape (B, S, D) for integer positions (B, S) and inverse frequencies (D/2,), in fp32 then
    cast to dtype, as transformers' rotary embedding computes them."""
    check(isinstance(position_ids, torch.Tensor) and position_ids.dim() == 2 and not position_ids.is_floating_point(),
          "rope_cos_sin: `position_ids` must be an integer tensor of shape (batch, seq)")
    check_tensor("rope_cos_sin", "inv_freq", inv_freq)
    check(inv_freq.dim() == 1, f"rope_cos_sin: `inv_freq` must be 1-D (head_dim/2,), got {tuple(inv_freq.shape)}")
    freqs = position_ids.float()[..., None] * inv_freq.float().to(position_ids.device)[None, None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * attention_scaling).to(dtype), (emb.sin() * attention_scaling).to(dtype)


def _bshd(t, unsqueeze_dim):
    return t.transpose(1, 2) if unsqueeze_dim == 1 else t


def _launch(q, k, cos, sin, q_out, k_out, unsqueeze_dim, inverse):
    from fastft.kernels.rope import rope_rotate

    B, S = (q.shape[0], q.shape[2]) if unsqueeze_dim == 1 else q.shape[:2]
    cos, sin = cos.expand(B, S, cos.shape[-1]), sin.expand(B, S, sin.shape[-1])
    if cos.stride() != sin.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    rope_rotate(_bshd(q, unsqueeze_dim), _bshd(k, unsqueeze_dim), cos, sin, _bshd(q_out, unsqueeze_dim),
                _bshd(k_out, unsqueeze_dim), inverse=inverse)


def _inverse(ctx, dq, dk):
    cos, sin = ctx.saved_tensors
    gq, gk = torch.empty_like(dq), torch.empty_like(dk)
    _launch(dq, dk, cos, sin, gq, gk, ctx.unsqueeze_dim, inverse=True)
    return gq, gk


class RoPEFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin, unsqueeze_dim):
        q_out, k_out = torch.empty_like(q), torch.empty_like(k)
        _launch(q, k, cos, sin, q_out, k_out, unsqueeze_dim, inverse=False)
        ctx.save_for_backward(cos, sin)
        ctx.unsqueeze_dim = unsqueeze_dim
        return q_out, k_out

    @staticmethod
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
    def backward(ctx, dq, dk):
        return (*_inverse(ctx, dq, dk), None, None, None)


def validate_rope_args(q, k, cos, sin, unsqueeze_dim, op="rope") -> None:
    for name, t in (("q", q), ("k", k), ("cos", cos), ("sin", sin)):
        check_tensor(op, name, t)
    check(unsqueeze_dim in (1, 2), f"{op}: `unsqueeze_dim` must be 1 (q is (B, H, S, D)) or 2 (q is (B, S, H, D)), "
                                   f"got {unsqueeze_dim!r}")
    check(q.dim() == 4 and k.dim() == 4, f"{op}: `q` and `k` must be 4-D, got shapes {tuple(q.shape)} and "
                                         f"{tuple(k.shape)}")
    seq_dim = 2 if unsqueeze_dim == 1 else 1
    B, S, D = q.shape[0], q.shape[seq_dim], q.shape[-1]
    check(D % 2 == 0, f"{op}: the head dimension must be even (rotate_half splits it), got {D}")
    check(k.shape[0] == B and k.shape[seq_dim] == S and k.shape[-1] == D,
          f"{op}: `k` {tuple(k.shape)} must match `q` {tuple(q.shape)} in batch, sequence and head_dim")
    for name, t in (("cos", cos), ("sin", sin)):
        check(t.dim() == 3 and t.shape[0] in (1, B) and t.shape[1] == S and t.shape[2] == D,
              f"{op}: `{name}` must have shape ({B} or 1, {S}, {D}), got {tuple(t.shape)}")
        check(t.device == q.device, f"{op}: `{name}` is on {t.device} but `q` is on {q.device}")
    check(q.dtype == k.dtype, f"{op}: `q` is {q.dtype} but `k` is {k.dtype}")
    check(k.device == q.device, f"{op}: `k` is on {k.device} but `q` is on {q.device}")


def _cos_sin(position_ids, cos, sin, inv_freq, attention_scaling, dtype, op):
    if position_ids is None:
        check(cos is not None and sin is not None, f"{op}: give `cos` and `sin`, or `position_ids` and `inv_freq`")
        return cos, sin
    check(cos is None and sin is None, f"{op}: give either `cos`/`sin` or `position_ids`, not both")
    check(inv_freq is not None, f"{op}: `position_ids` needs `inv_freq` (the rotary embedding's inverse frequencies)")
    return rope_cos_sin(position_ids, inv_freq, attention_scaling, dtype)


def rope(q, k, cos=None, sin=None, *, position_ids=None, inv_freq=None, attention_scaling=1.0, unsqueeze_dim=1,
         backend="auto"):
    """(q·cos + rotate_half(q)·sin, k·cos + rotate_half(k)·sin) as new tensors; see the module docstring."""
    cos, sin = _cos_sin(position_ids, cos, sin, inv_freq, attention_scaling, q.dtype, "rope")
    validate_rope_args(q, k, cos, sin, unsqueeze_dim)
    backend = resolve_backend("rope", backend, q.device)
    if backend == "torch" or q.numel() == 0 or cos.requires_grad or sin.requires_grad:
        return rope_reference(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim)
    with torch.autocast(q.device.type, enabled=False):
        return RoPEFunction.apply(q, k, cos, sin, unsqueeze_dim)


def rope_(q, k, cos=None, sin=None, *, position_ids=None, inv_freq=None, attention_scaling=1.0, unsqueeze_dim=1,
          backend="auto"):
    """`rope` written into q and k themselves; returns (q, k).

    Autograd lets a Function mutate views only when it returns a single tensor, so when q or k is a view
    (transformers' transposed projections) and needs a gradient, the rotation is computed out of place and
    copied back (torch then records the in-place update of the view itself). Plain tensors, or no gradient:
    one kernel, truly in place.
    """
    cos, sin = _cos_sin(position_ids, cos, sin, inv_freq, attention_scaling, q.dtype, "rope_")
    validate_rope_args(q, k, cos, sin, unsqueeze_dim, op="rope_")
    backend = resolve_backend("rope_", backend, q.device)
    if backend == "torch" or q.numel() == 0 or cos.requires_grad or sin.requires_grad:
        q_new, k_new = rope_reference(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim)
        return q.copy_(q_new), k.copy_(k_new)
    with torch.autocast(q.device.type, enabled=False):
        if not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad)):
            _launch(q, k, cos, sin, q, k, unsqueeze_dim, inverse=False)
            return q, k
        if q._is_view() or k._is_view():
            q_new, k_new = RoPEFunction.apply(q, k, cos, sin, unsqueeze_dim)
            return q.copy_(q_new), k.copy_(k_new)
        return RoPEInplaceFunction.apply(q, k, cos, sin, unsqueeze_dim)
