"""Exact attention with O(S) memory: `flash_attention` (causal, GQA, packed sequences, prefix-KV, sliding window).

`flash_attention` validates once, then dispatches: the Triton kernels (fastft.kernels.attention_fwd / _bwd)
on CUDA, torch elsewhere (`attention_sdpa`: torch's scaled_dot_product_attention with the mask written out,
O(S) memory on the CPU too). The pure-torch `attention_reference` materialises the scores; it is the ground
truth of the tests, and the torch path for rows that see no key.

Masks, with query i of a sequence of n_q queries and n_k keys aligned bottom-right (off = n_k - n_q, so
with a KV cache the last query is the last position): key j is visible when
    causal:        j <= i + off
    window = w:    j >  i + off - w   (and, without causal, j < i + off + w), as transformers' sliding_window
Prefix keys are visible to every query, whatever the mask.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import torch.nn.functional as F

from fastft.kernels.host import UNBOUNDED
from fastft.ops.compiled import capturing, compiling, needed, unused
from fastft.ops.shared import (autocast_inputs, autocast_off, check_backend, finite, first_order_only,
                               resolve_backend, to_dtype)
from fastft.ops.shared import check as _check  # the name this file's many checks use

MAX_HEAD_DIM = 256


def mask_bounds(causal: bool, window) -> tuple[int, int]:
    """(left, right): key j is visible to query position p when p - left <= j <= p + right."""
    # Windows past UNBOUNDED (2**30) mean the same as no window for any sequence the kernels can take; clamping
    # keeps the kernels' int32 arguments and position sums far from overflow (window=2**31-1 is a common "no limit").
    left = UNBOUNDED if window is None else min(int(window) - 1, UNBOUNDED)
    right = 0 if causal else left
    return left, right


# ----------------------------------------------------------------------------------------------
# Reference

def head_dim_supported(head_dim: int) -> bool:
    """The head sizes flash_attention takes: multiples of 8 in [16, MAX_HEAD_DIM]."""
    return head_dim % 8 == 0 and 16 <= head_dim <= MAX_HEAD_DIM


def gqa_flag(n_heads, n_kv_heads) -> bool:
    """SDPA's enable_gqa wants a bool: under torch.compile(dynamic=True) head counts are symbolic, and an `if`
    specialises their comparison (a guard) where bool() keeps it symbolic."""
    if n_heads != n_kv_heads:
        return True
    return False


def visible_mask(n_q: int, n_k: int, causal: bool, window, device=None) -> torch.Tensor:
    """(n_q, n_k) bool: which keys each query sees (bottom-right aligned)."""
    left, right = mask_bounds(causal, window)
    d = (torch.arange(n_q, device=device)[:, None] + (n_k - n_q)) - torch.arange(n_k, device=device)[None, :]
    return (d <= left) & (d >= -right)


def _reference_dense(q, k, v, causal, scale, prefix_k, prefix_v, window):
    B, n_q, H, D = q.shape
    n_k, n_kv = k.shape[1], k.shape[2]
    group = H // n_kv
    s = torch.einsum("bqhd,bkhd->bhqk", q, k.repeat_interleave(group, dim=2)) * scale
    s = s.masked_fill(~visible_mask(n_q, n_k, causal, window, q.device), float("-inf"))
    vals = v.repeat_interleave(group, dim=2)
    if prefix_k is not None:
        pk = prefix_k.expand(B, -1, -1, -1).repeat_interleave(group, dim=2)
        s = torch.cat([torch.einsum("bqhd,bkhd->bhqk", q, pk) * scale, s], dim=-1)
        vals = torch.cat([prefix_v.expand(B, -1, -1, -1).repeat_interleave(group, dim=2), vals], dim=1)
    seen = torch.isfinite(s).any(-1, keepdim=True)
    p = torch.softmax(s, dim=-1).masked_fill(~seen, 0.0)  # queries that see nothing output 0
    return torch.einsum("bhqk,bkhd->bqhd", p, vals)


def attention_reference(q, k, v, *, causal=False, softmax_scale=None, cu_seqlens=None, prefix_k=None,
                        prefix_v=None, window=None):
    """softmax(scale·Q·Kᵀ + mask)·V in plain torch (autograd through torch), same arguments as flash_attention.

    Computes in fp32 for fp16/bf16 inputs (fp64 stays fp64) and returns q's dtype.
    """
    return _per_sequence(_reference_dense, q, k, v, causal, softmax_scale, cu_seqlens, prefix_k, prefix_v, window)


def attention_sdpa(q, k, v, *, causal=False, softmax_scale=None, cu_seqlens=None, prefix_k=None, prefix_v=None,
                   window=None):
    """attention_reference's result through torch's scaled_dot_product_attention: the torch backend. On the CPU
    torch's flash kernel keeps memory O(S) and runs ~10× the reference's speed at S=2048 (tiny Llama, fwd+bwd);
    masks it cannot name (bottom-right causal, windows, prefix) are passed as a boolean (n_q, n_k) mask. fp16/bf16
    stay in their dtype (SDPA accumulates in fp32): an fp32 copy would double what autograd saves (q, k, v and the
    output) for gradients ~1 ulp closer. A problem where some row sees no key goes to the fp32 reference, which
    outputs 0 there (torch's SDPA kernels have not always agreed: NaN in some)."""
    return _per_sequence(_sdpa_dense, q, k, v, causal, softmax_scale, cu_seqlens, prefix_k, prefix_v, window,
                         work=q.dtype)


def _per_sequence(dense, q, k, v, causal, softmax_scale, cu_seqlens, prefix_k, prefix_v, window, work=None):
    """dense(q, k, v, causal, scale, prefix_k, prefix_v, window) on (B, S, H, D) inputs in the working precision
    `work` (default fp32 for fp16/bf16, fp64 stays fp64), once for a batch or once per packed document; returns
    q's dtype."""
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    if work is None:
        work = torch.float64 if q.dtype == torch.float64 else torch.float32
    q_, k_, v_ = q.to(work), k.to(work), v.to(work)
    pk = prefix_k.to(work) if prefix_k is not None else None
    pv = prefix_v.to(work) if prefix_v is not None else None
    if cu_seqlens is None:
        return dense(q_, k_, v_, causal, scale, pk, pv, window).to(q.dtype)
    bounds = cu_seqlens.tolist()
    outs = []
    # empty documents (cu_seqlens padded with the total, as built under torch.compile) are skipped, unless all are
    docs = [(i, a, b) for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])) if b > a] or [(0, 0, 0)]
    for i, a, b in docs:
        pki = pvi = None
        if pk is not None:
            j = 0 if pk.shape[0] == 1 else i
            pki, pvi = pk[j : j + 1], pv[j : j + 1]
        outs.append(dense(q_[None, a:b], k_[None, a:b], v_[None, a:b], causal, scale, pki, pvi, window)[0])
    return torch.cat(outs, dim=0).to(q.dtype)


def _sdpa_dense(q, k, v, causal, scale, prefix_k, prefix_v, window):
    B, n_q, H, D = q.shape
    n_k, n_kv = k.shape[1], k.shape[2]
    n_prefix = 0 if prefix_k is None else prefix_k.shape[1]
    left, right = mask_bounds(causal, window)
    # Row i sits at key position i + n_k - n_q and sees [pos - left, pos + right] ∩ [0, n_k); left >= 0, so only the
    # first row can see nothing, when its position + right < 0 (causal with n_q > n_k), or when there are no keys.
    if n_q == 0 or (n_prefix == 0 and (n_k == 0 or n_k - n_q + right < 0)):
        up = (lambda t: t) if q.dtype == torch.float64 else (lambda t: None if t is None else t.float())
        return _reference_dense(up(q), up(k), up(v), causal, scale, up(prefix_k), up(prefix_v), window).to(q.dtype)
    mask, is_causal = None, False
    if window is None and n_prefix == 0 and (not causal or n_q == n_k):
        is_causal = causal  # SDPA's causal is top-left aligned: the same as bottom-right when n_q == n_k
    else:
        mask = visible_mask(n_q, n_k, causal, window, q.device)
        if n_prefix:
            mask = torch.cat([mask.new_ones(n_q, n_prefix), mask], dim=1)
            k = torch.cat([prefix_k.expand(B, -1, -1, -1), k], dim=1)
            v = torch.cat([prefix_v.expand(B, -1, -1, -1), v], dim=1)
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                                       is_causal=is_causal, scale=scale, enable_gqa=gqa_flag(H, n_kv))
    return o.transpose(1, 2)


# ----------------------------------------------------------------------------------------------
# Validation

def _is_int(x) -> bool:
    """A Python int (not a bool), or the symbolic int torch.compile passes for one under dynamic shapes."""
    return isinstance(x, (int, torch.SymInt)) and not isinstance(x, bool)


def _validate(q, k, v, causal, softmax_scale, cu_seqlens, max_seqlen, prefix_k, prefix_v, window):
    # Messages that name a token, batch or document count are built only on failure: under torch.compile with
    # dynamic shapes, formatting a symbolic size would specialize the graph to that size.
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check(isinstance(t, torch.Tensor),
               lambda: f"flash_attention: `{name}` must be a torch.Tensor, got {type(t).__name__}")
        # fp64 too: backend="auto" sends it to torch, "triton" refuses it (resolve_backend)
        _check(t.is_floating_point(), lambda: f"flash_attention: `{name}` must be a floating-point tensor (float16, "
                                              f"bfloat16 or float32 on the Triton backend), got {t.dtype}")
    varlen = cu_seqlens is not None
    rank, layout = (3, "(total_tokens, heads, head_dim)") if varlen else (4, "(batch, seqlen, heads, head_dim)")
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check(t.dim() == rank, lambda: f"flash_attention: `{name}` must be {rank}-D {layout}"
                                        f"{' with cu_seqlens' if varlen else ''}, got shape {tuple(t.shape)}")
    _check(k.shape == v.shape, lambda: f"flash_attention: `k` and `v` must have the same shape, got {tuple(k.shape)} "
                                       f"and {tuple(v.shape)}")
    D, H, n_kv = q.shape[-1], q.shape[-2], k.shape[-2]
    _check(k.shape[-1] == D, lambda: f"flash_attention: `k` has head_dim {k.shape[-1]} but `q` has {D}")
    _check(head_dim_supported(D),
           lambda: f"flash_attention: head_dim must be a multiple of 8 in [16, {MAX_HEAD_DIM}] (e.g. 64, 80, 96, 128, "
           f"256), got {D}")
    _check(n_kv >= 1 and H % n_kv == 0,
           lambda: f"flash_attention: `q` has {H} heads, which is not a multiple of the {n_kv} KV heads of `k` (GQA "
           "needs heads % kv_heads == 0)")
    _check(q.dtype == k.dtype == v.dtype, lambda: f"flash_attention: `q`, `k`, `v` must share a dtype, got "
                                                  f"{q.dtype}, {k.dtype}, {v.dtype}")
    tensors = [q, k, v] + [t for t in (prefix_k, prefix_v, cu_seqlens) if t is not None]
    devices = {t.device for t in tensors if isinstance(t, torch.Tensor)}
    _check(len(devices) == 1,
           lambda: f"flash_attention: all tensors must be on one device, got {sorted(map(str, devices))}")
    if varlen:
        _check(isinstance(cu_seqlens, torch.Tensor) and cu_seqlens.dtype == torch.int32 and cu_seqlens.dim() == 1
               and cu_seqlens.numel() >= 2,
               lambda: "flash_attention: `cu_seqlens` must be a 1-D int32 tensor of length n_docs + 1 (cumulative "
               f"lengths starting at 0), got {getattr(cu_seqlens, 'dtype', type(cu_seqlens).__name__)} "
               f"{tuple(getattr(cu_seqlens, 'shape', ()))}")
        if not k.shape[0] == q.shape[0]:
            raise ValueError(f"flash_attention: packed `q` has {q.shape[0]} tokens but `k` has {k.shape[0]}; packed "
                             "self-attention needs one token count")
        if max_seqlen is not None:
            if not (_is_int(max_seqlen) and max_seqlen >= 0):
                raise ValueError(f"flash_attention: `max_seqlen` must be a non-negative int, got {max_seqlen!r}")
            n_docs = cu_seqlens.numel() - 1
            # No device sync: n_docs documents of at most max_seqlen tokens cannot hold more tokens than that.
            if not max_seqlen * n_docs >= q.shape[0]:
                raise ValueError(f"flash_attention: `max_seqlen`={max_seqlen} is smaller than the longest document: "
                                 f"{n_docs} documents of at most {max_seqlen} tokens cannot hold the {q.shape[0]} "
                                 "packed tokens")
    else:
        if not k.shape[0] == q.shape[0]:
            raise ValueError(f"flash_attention: `k` has batch {k.shape[0]} but `q` has {q.shape[0]}")
        _check(k.shape[1] >= 1 and q.shape[1] >= 1, "flash_attention: `q` and `k` need at least one position each")
        _check(max_seqlen is None, "flash_attention: `max_seqlen` only goes with `cu_seqlens`")
    _check((prefix_k is None) == (prefix_v is None), "flash_attention: pass both `prefix_k` and `prefix_v`, or neither")
    if prefix_k is not None:
        n_seq = cu_seqlens.numel() - 1 if varlen else q.shape[0]
        for name, t in (("prefix_k", prefix_k), ("prefix_v", prefix_v)):
            if not (isinstance(t, torch.Tensor) and t.dim() == 4 and t.shape[0] in (1, n_seq) and t.shape[1] >= 1
                    and tuple(t.shape[2:]) == (n_kv, D)):
                raise ValueError(f"flash_attention: `{name}` must have shape (1 or {n_seq}, prefix_len, {n_kv}, {D}), "
                                 f"got {tuple(getattr(t, 'shape', ()))}")
            _check(t.dtype == q.dtype, lambda: f"flash_attention: `{name}` is {t.dtype} but `q` is {q.dtype}")
        _check(prefix_k.shape == prefix_v.shape, "flash_attention: `prefix_k` and `prefix_v` must have the same shape")
    if softmax_scale is not None:
        _check(isinstance(softmax_scale, (int, float)) and finite(softmax_scale) and softmax_scale > 0,
               lambda: f"flash_attention: `softmax_scale` must be a positive finite number, got {softmax_scale!r}")
    if window is not None:
        if not (_is_int(window) and window >= 1):
            raise ValueError(f"flash_attention: `window` must be a positive int (keys within `window` positions), "
                             f"got {window!r}")
    _check(isinstance(causal, bool), lambda: f"flash_attention: `causal` must be a bool, got {causal!r}")


def _read_cu_seqlens(cu_seqlens: torch.Tensor, total: int) -> tuple[int, int]:
    """Checks the values (one device sync); returns the longest document and the number of documents before the
    empty ones at the end (cu_seqlens padded with `total`, as the attention integration builds it in a graph)."""
    lengths = cu_seqlens.diff()
    stats = torch.stack([cu_seqlens[0], cu_seqlens[-1], lengths.min(), lengths.max(),
                         (cu_seqlens < total).sum()]).tolist()
    _check(stats[0] == 0 and stats[1] == total and stats[2] >= 0,
           f"flash_attention: `cu_seqlens` must rise from 0 to the {total} packed tokens without decreasing, "
           f"got first {stats[0]}, last {stats[1]}, smallest step {stats[2]}")
    return int(stats[3]), int(stats[4])


# ----------------------------------------------------------------------------------------------
# Autograd: the eager door (FlashAttentionFunction) and the traced door (fastft::flash_attention and its
# backward as custom ops, fastft.ops.compiled) share _forward / _backward.

def _unit_last(t):
    return t if t is None or t.stride(-1) == 1 else t.contiguous()


def _resolve_max_seqlen(cu_seqlens, max_seqlen, total: int, device: torch.device, debug: bool = True):
    """(cu_seqlens, the grid bound of packed documents): the caller's max_seqlen (capped at all tokens), or the
    longest document, read from cu_seqlens (one device sync), which then also drops empty documents at the end
    (they would only widen the grid). No sync while a CUDA graph is captured: a derived bound would be frozen into
    the graph (and the sync itself is not allowed there), so max_seqlen is required then."""
    if cu_seqlens is None:
        return None, None
    if max_seqlen is None:
        _check(not capturing(device),
               "flash_attention: pass `max_seqlen` (the longest document, a Python int) with `cu_seqlens` when "
               "capturing a CUDA graph (torch.compile mode='reduce-overhead' or torch.cuda.graph): deriving it "
               "reads cu_seqlens on the host, which a captured graph cannot do (with attn_implementation='fastft': "
               "pass cu_seq_lens_q/k and max_length_q/k as ints, e.g. fastft.integration.packing.PackingCollator)")
        longest, n_docs = _read_cu_seqlens(cu_seqlens, total)
        return cu_seqlens[:n_docs + 1], longest
    if debug and os.environ.get("FASTFT_DEBUG", "0") == "1" and not capturing(device):
        # the caller's contract, checked at the cost of a sync
        longest = _read_cu_seqlens(cu_seqlens, total)[0]
        _check(longest <= max_seqlen, f"flash_attention: `max_seqlen`={max_seqlen} is smaller than the longest "
                                      f"document ({longest} tokens)")
    return cu_seqlens, min(max_seqlen, total)  # no document is longer than all tokens: bounds the grid


def _forward(q, k, v, prefix_k, prefix_v, cu_seqlens, max_seqlen, scale, left, right):
    """((q, k, v, prefix_k, prefix_v) with unit last strides, o, lse)."""
    from fastft.kernels.attention_fwd import attention_forward

    q, k, v, prefix_k, prefix_v = (_unit_last(t) for t in (q, k, v, prefix_k, prefix_v))
    o, lse = attention_forward(q, k, v, sm_scale=scale, left=left, right=right, cu_seqlens=cu_seqlens,
                               max_seqlen=max_seqlen, prefix_k=prefix_k, prefix_v=prefix_v)
    return (q, k, v, prefix_k, prefix_v), o, lse


def _backward(do, q, k, v, o, lse, prefix_k, prefix_v, cu_seqlens, max_seqlen, scale, left, right):
    """(dq, dk, dv, dprefix_k, dprefix_v); the prefix gradients are None without a prefix."""
    from fastft.kernels.attention_bwd import attention_backward

    q, k, v, prefix_k, prefix_v = (_unit_last(t) for t in (q, k, v, prefix_k, prefix_v))
    dq, dk, dv, dpk, dpv = attention_backward(_unit_last(to_dtype(do, q.dtype)), q, k, v, o, lse, sm_scale=scale,
                                              left=left, right=right, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen,
                                              prefix_k=prefix_k, prefix_v=prefix_v)
    if dpk is not None and dpk.shape[0] < prefix_k.shape[0]:
        # a prefix per document, and the empty documents at the end dropped (_resolve_max_seqlen): theirs get zeros
        dpk, dpv = (torch.cat([g, g.new_zeros(prefix_k.shape[0] - g.shape[0], *g.shape[1:])]) for g in (dpk, dpv))
    return dq, dk, dv, dpk, dpv


class FlashAttentionFunction(torch.autograd.Function):
    """The eager door (fastft.ops.compiled); max_seqlen comes resolved (_resolve_max_seqlen)."""

    @staticmethod
    def forward(ctx, q, k, v, prefix_k, prefix_v, cu_seqlens, max_seqlen, scale, left, right):
        (q, k, v, prefix_k, prefix_v), o, lse = _forward(q, k, v, prefix_k, prefix_v, cu_seqlens, max_seqlen,
                                                         scale, left, right)
        ctx.save_for_backward(q, k, v, o, lse, prefix_k, prefix_v, cu_seqlens)
        ctx.meta = (max_seqlen, scale, left, right)
        return o

    @staticmethod
    @first_order_only
    def backward(ctx, do):
        q, k, v, o, lse, prefix_k, prefix_v, cu_seqlens = ctx.saved_tensors
        max_seqlen, scale, left, right = ctx.meta
        dq, dk, dv, dpk, dpv = _backward(do, q, k, v, o, lse, prefix_k, prefix_v, cu_seqlens, max_seqlen, scale,
                                         left, right)
        return dq, dk, dv, dpk, dpv, None, None, None, None, None


# The traced door. max_seqlen may be None with cu_seqlens: each body then reads the longest document from
# cu_seqlens itself (a device sync, as eager does once), so tracing needs no data-dependent value.
@torch.library.custom_op("fastft::flash_attention", mutates_args=())
def flash_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix_k: Optional[torch.Tensor],
                       prefix_v: Optional[torch.Tensor], cu_seqlens: Optional[torch.Tensor],
                       max_seqlen: Optional[int], scale: float, left: int, right: int
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    if q.numel() == 0:  # no query (e.g. a packed batch of no tokens): nothing to attend, nothing to read
        return q.new_empty(q.shape), q.new_empty(_lse_shape(q, cu_seqlens), dtype=torch.float32)
    cu_seqlens, max_seqlen = _resolve_max_seqlen(cu_seqlens, max_seqlen, q.shape[0], q.device)
    _, o, lse = _forward(q, k, v, prefix_k, prefix_v, cu_seqlens, max_seqlen, scale, left, right)
    return o, lse


def _lse_shape(q, cu_seqlens) -> tuple:
    return (q.shape[1], q.shape[0]) if cu_seqlens is not None else (q.shape[0], q.shape[2], q.shape[1])


@flash_attention_op.register_fake
def _(q, k, v, prefix_k, prefix_v, cu_seqlens, max_seqlen, scale, left, right):
    return q.new_empty(q.shape), q.new_empty(_lse_shape(q, cu_seqlens), dtype=torch.float32)


@torch.library.custom_op("fastft::flash_attention_backward", mutates_args=())
def flash_attention_backward_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                o: torch.Tensor, lse: torch.Tensor, prefix_k: Optional[torch.Tensor],
                                prefix_v: Optional[torch.Tensor], cu_seqlens: Optional[torch.Tensor],
                                max_seqlen: Optional[int], scale: float, left: int, right: int
                                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    if q.numel() == 0:  # no query attended: the keys, values and prefix get zero gradients
        prefix = (prefix_k.new_zeros(prefix_k.shape), prefix_v.new_zeros(prefix_v.shape)) if prefix_k is not None \
            else (unused(q), unused(q))
        return q.new_zeros(q.shape), k.new_zeros(k.shape), v.new_zeros(v.shape), *prefix
    cu_seqlens, max_seqlen = _resolve_max_seqlen(cu_seqlens, max_seqlen, q.shape[0], q.device, debug=False)
    dq, dk, dv, dpk, dpv = _backward(do, q, k, v, o, lse, prefix_k, prefix_v, cu_seqlens, max_seqlen, scale,
                                     left, right)
    return dq, dk, dv, (dpk if dpk is not None else unused(q)), (dpv if dpv is not None else unused(q))


@flash_attention_backward_op.register_fake
def _(do, q, k, v, o, lse, prefix_k, prefix_v, cu_seqlens, max_seqlen, scale, left, right):
    prefix = (prefix_k.new_empty(prefix_k.shape), prefix_v.new_empty(prefix_v.shape)) if prefix_k is not None \
        else (unused(q), unused(q))
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), *prefix


def _setup_context(ctx, inputs, output):
    q, k, v, prefix_k, prefix_v, cu_seqlens, max_seqlen, scale, left, right = inputs
    ctx.save_for_backward(q, k, v, output[0], output[1], prefix_k, prefix_v, cu_seqlens)
    ctx.meta = (max_seqlen, scale, left, right)


def _backward_op(ctx, do, _dlse):
    q, k, v, o, lse, prefix_k, prefix_v, cu_seqlens = ctx.saved_tensors
    max_seqlen, scale, left, right = ctx.meta
    dq, dk, dv, dpk, dpv = flash_attention_backward_op(do, q, k, v, o, lse, prefix_k, prefix_v, cu_seqlens,
                                                       max_seqlen, scale, left, right)
    has_prefix = prefix_k is not None
    return dq, dk, dv, needed(dpk, has_prefix), needed(dpv, has_prefix), None, None, None, None, None


flash_attention_op.register_autograd(_backward_op, setup_context=_setup_context)


# The torch backend's traced door for packed documents: its body splits the batch per document on the host
# (cu_seqlens.tolist()), which dynamo cannot trace (a graph break per attention layer, and a whole compiled model
# falling back to per-layer frames). As a custom op it is one node of the graph; its backward recomputes the
# forward under autograd (as eager's autograd would run it: the same result) rather than saving its insides.
@torch.library.custom_op("fastft::attention_sdpa_varlen", mutates_args=())
def attention_sdpa_varlen_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix_k: Optional[torch.Tensor],
                             prefix_v: Optional[torch.Tensor], cu_seqlens: torch.Tensor, max_seqlen: Optional[int],
                             scale: float, causal: bool, window: Optional[int]) -> torch.Tensor:
    return _sdpa_varlen(q, k, v, prefix_k, prefix_v, cu_seqlens, max_seqlen, scale, causal, window)


@attention_sdpa_varlen_op.register_fake
def _(q, k, v, prefix_k, prefix_v, cu_seqlens, max_seqlen, scale, causal, window):
    return q.new_empty(q.shape)


@torch.library.custom_op("fastft::attention_sdpa_varlen_backward", mutates_args=())
def attention_sdpa_varlen_backward_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                      prefix_k: Optional[torch.Tensor], prefix_v: Optional[torch.Tensor],
                                      cu_seqlens: torch.Tensor, scale: float, causal: bool, window: Optional[int]
                                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    has_prefix = prefix_k is not None

    def forward(q, k, v, *prefix):
        return attention_sdpa(q, k, v, causal=causal, softmax_scale=scale, cu_seqlens=cu_seqlens,
                              prefix_k=prefix[0] if prefix else None, prefix_v=prefix[1] if prefix else None,
                              window=window)

    # torch.func: a custom op's body runs below autograd, where torch.autograd.grad would see no graph
    _, vjp = torch.func.vjp(forward, q, k, v, *((prefix_k, prefix_v) if has_prefix else ()))
    grads = vjp(do)
    return (*grads, *(() if has_prefix else (unused(q), unused(q))))


@attention_sdpa_varlen_backward_op.register_fake
def _(do, q, k, v, prefix_k, prefix_v, cu_seqlens, scale, causal, window):
    prefix = (prefix_k.new_empty(prefix_k.shape), prefix_v.new_empty(prefix_v.shape)) if prefix_k is not None \
        else (unused(q), unused(q))
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), *prefix


def _setup_sdpa_varlen(ctx, inputs, output):
    q, k, v, prefix_k, prefix_v, cu_seqlens, _max_seqlen, scale, causal, window = inputs
    ctx.save_for_backward(q, k, v, prefix_k, prefix_v, cu_seqlens)
    ctx.meta = (scale, causal, window)


def _backward_sdpa_varlen(ctx, do):
    q, k, v, prefix_k, prefix_v, cu_seqlens = ctx.saved_tensors
    dq, dk, dv, dpk, dpv = attention_sdpa_varlen_backward_op(do, q, k, v, prefix_k, prefix_v, cu_seqlens, *ctx.meta)
    has_prefix = prefix_k is not None
    return dq, dk, dv, needed(dpk, has_prefix), needed(dpv, has_prefix), None, None, None, None, None


attention_sdpa_varlen_op.register_autograd(_backward_sdpa_varlen, setup_context=_setup_sdpa_varlen)


def _sdpa_varlen(q, k, v, prefix_k, prefix_v, cu_seqlens, max_seqlen, scale, causal, window):
    """The torch backend on packed documents: cu_seqlens checked (it is read on the host anyway), then
    attention_sdpa."""
    longest = _read_cu_seqlens(cu_seqlens, q.shape[0])[0]
    _check(max_seqlen is None or longest <= max_seqlen,
           f"flash_attention: `max_seqlen`={max_seqlen} is smaller than the longest document ({longest} tokens)")
    return attention_sdpa(q, k, v, causal=causal, softmax_scale=scale, cu_seqlens=cu_seqlens, prefix_k=prefix_k,
                          prefix_v=prefix_v, window=window)


def flash_attention(q, k, v, *, causal=False, softmax_scale=None, cu_seqlens=None, max_seqlen=None,
                    prefix_k=None, prefix_v=None, window=None, backend="auto"):
    """Exact attention softmax(scale·Q·Kᵀ + mask)·V, forward and backward in O(sequence) memory.

    q: (batch, seqlen_q, heads, head_dim); k, v: (batch, seqlen_k, kv_heads, head_dim), heads % kv_heads == 0
    (GQA/MQA without repeating K/V). Packed: with `cu_seqlens` (int32, n_docs + 1 cumulative lengths) q/k/v
    are (total_tokens, heads, head_dim) and no token attends across documents; `max_seqlen` (the longest
    document) saves a device sync. Contract: max_seqlen >= the longest document (a larger value is only
    slower; a smaller one would leave rows uncomputed). A cheap check rejects values that cannot hold all
    tokens; FASTFT_DEBUG=1 checks it exactly (one device sync) and validates cu_seqlens. `prefix_k`/`prefix_v`: (batch or 1, P, kv_heads, head_dim) keys every query
    attends to, unmasked (prefix tuning); they get gradients. `causal` aligns bottom-right when seqlen_q !=
    seqlen_k; `window` = w keeps the w most recent keys (and, without causal, those < w ahead); any w > 2**30
    (e.g. 2**31 - 1 as "no limit") means no window.
    head_dim: a multiple of 8 from 16 to 256; fp16/bf16/fp32 (fp64 on the torch backend, where auto sends it).
    Returns q's shape and dtype.
    backend: "auto" (Triton on CUDA, torch elsewhere), "triton" or "torch".
    torch.compile traces the Triton backend as one custom op, fastft::flash_attention (fastft.ops.compiled); a
    missing max_seqlen is then derived inside the op (one sync), which CUDA-graph capture refuses (ValueError).
    The torch backend traces inline, packed documents as the op fastft::attention_sdpa_varlen.
    """
    check_backend("flash_attention", backend)
    q, k, v, prefix_k, prefix_v = autocast_inputs(q, k, v, prefix_k, prefix_v)
    _validate(q, k, v, causal, softmax_scale, cu_seqlens, max_seqlen, prefix_k, prefix_v, window)
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)

    backend = resolve_backend("flash_attention", backend, q.device, arg="q", dtype=q.dtype)
    # an empty q under torch.compile takes the custom op too (the torch path would read cu_seqlens on the host)
    if backend == "torch" or (q.numel() == 0 and not compiling()):
        if cu_seqlens is None:
            return attention_sdpa(q, k, v, causal=causal, softmax_scale=scale, prefix_k=prefix_k, prefix_v=prefix_v,
                                  window=window)
        if compiling():  # the per-document split reads cu_seqlens on the host: one node of the graph
            return attention_sdpa_varlen_op(q, k, v, prefix_k, prefix_v, cu_seqlens, max_seqlen, scale, causal, window)
        return _sdpa_varlen(q, k, v, prefix_k, prefix_v, cu_seqlens, max_seqlen, scale, causal, window)
    left, right = mask_bounds(causal, window)
    with autocast_off(q.device.type):
        if compiling():  # max_seqlen as given (None: the op body derives it)
            return flash_attention_op(q, k, v, prefix_k, prefix_v, cu_seqlens, max_seqlen, scale, left, right)[0]
        cu_seqlens, max_seqlen = _resolve_max_seqlen(cu_seqlens, max_seqlen, q.shape[0], q.device)
        return FlashAttentionFunction.apply(q, k, v, prefix_k, prefix_v, cu_seqlens, max_seqlen, scale, left, right)
