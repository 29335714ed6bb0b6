"""`attn_implementation="fastft"` for transformers models (Llama family): attention through fastft.ops.flash_attention.

Importing this module registers the implementation (and `register_attention()` does it again, harmlessly): the
attention function here, the mask function in fastft.integration.attention_masks (with what it notes for the
attention calls of a forward). It mirrors transformers' FlashAttention integration:

- the mask function returns None unless the 2-D padding mask has padding, so plain batches run the dense
  causal kernel;
- padded batches are unpadded into packed documents (varlen) and padded back;
- packed batches (rows of concatenated documents, no attention mask) run varlen, with the document
  boundaries taken from `cu_seq_lens_q`/`cu_seq_lens_k` when the collator passes them (see
  fastft.integration.packing), else from `position_ids`, wherever they do not rise by 1, in every row
  (`_packed_documents`), as transformers' FlashAttention-2 path does, with or without a cache or an all-ones
  mask (its sdpa/eager masks separate documents only with neither); models whose layers get no position_ids
  (GPT-BigCode, Persimmon, Whisper's decoder: transformers' FlashAttention-2 mixes their documents) take the
  documents from the mask function transformers builds for packed rows (`attention_masks.documents_from_mask`);
- a KV cache or peft prefix tuning gives more keys than queries: causal then aligns bottom-right;
- fastft's prefix-tuning room (fastft.integration.methods.prefix) passes `fastft_prefix`, per layer the
  (prefix_k, prefix_v) every query attends to: handed to the op as prefix_k/prefix_v, no concatenation.

Not supported (ValueError): attention dropout, logit softcapping, attention sinks, any other score term a model
passes (T5's relative `position_bias`, sparse-attention `indices`), Llama 4's chunked attention past one chunk.
Custom 4-D masks, masks with an overlay (transformers' or/and mask functions), padded decoding with a cache
(q_len != kv_len) and, under a sliding window, padding between a row's kept tokens fall back to torch SDPA (a
fastft prefix in front of the keys).
"""
from __future__ import annotations

import contextlib
import threading
import warnings
import weakref

import torch
import torch.nn.functional as F

from fastft.integration.attention_masks import (bidirectional_window, causal_mask_window, documents,
                                               documents_from_mask, fastft_attention_mask, forwards_seen,
                                               traced_documents)
from fastft.ops.attention import MAX_HEAD_DIM, flash_attention, gqa_flag, mask_bounds, visible_mask
from fastft.ops.compiled import compiling
from fastft.ops.shared import BACKENDS, require_triton

NAME = "fastft"
_backend = "auto"


_PACKED_ROWS_UNDER_COMPILE = (
    "attn_implementation='fastft' under torch.compile: position_ids restart inside the rows of a batch of several "
    "rows (packed documents), which the traced graph cannot separate without reading them: pack into one row "
    "(batch 1), pass the collator's cu_seq_lens_q/k with it (fastft.integration.packing.PackingCollator, "
    "DataCollatorWithFlattening(return_flash_attn_kwargs=True)), or run this batch eagerly")
_memos: dict[str, tuple] = {}  # name -> (weakref to the tensor, (its version, key), result)
_prefix_state = threading.local()


@contextlib.contextmanager
def prefix_expected():
    """Inside the block (eagerly, in this thread) every attention call must carry `fastft_prefix`: the prefix room's
    forward and generate, so that a model whose layers drop keyword arguments on their way to the attention stops
    with an error rather than running without the prefix."""
    before = getattr(_prefix_state, "on", False)
    _prefix_state.on = True
    try:
        yield
    finally:
        _prefix_state.on = before


def _once_per_forward(name: str, tensor: torch.Tensor, key, compute):
    """compute() (values read on the host: a sync) once per forward rather than once per layer: every layer gets
    the same `tensor` (position_ids, the 2-D padding mask), so the result is kept for it while it lives unchanged
    (same object, same version counter), `key` (what else the result depends on) is the same, and no mask was built
    since (forwards_seen: a buffer rewritten through .data or NumPy keeps its version, and the next forward read
    the last one's documents). An inference tensor has no version counter: computed at every call."""
    version = None if tensor.is_inference() else tensor._version
    memo = _memos.get(name)
    stamp = (version, forwards_seen(), key)
    if version is not None and memo is not None and memo[0]() is tensor and memo[1] == stamp:
        return memo[2]
    result = compute()
    if version is not None:
        _memos[name] = (weakref.ref(tensor), stamp, result)
    return result


def _marking_documents(position_ids):
    """position_ids as they mark documents ((B, S) or (1, S)), None for multimodal RoPE's (3, B, S) positions, which
    mark none (transformers' masks read none from them either)."""
    return None if position_ids is None or position_ids.dim() > 2 else position_ids


def _packed_documents(position_ids, batch_size: int):
    """(cu_seqlens over the B·S flattened tokens, longest document) when some row holds several documents, else None.

    Documents are found as transformers' masks find them (masking_utils.find_packed_sequence_indices), in every row:
    one starts at a row's first token and wherever the position does not rise by 1 (restarts at 0 or at any other
    value; a row that continues a document from an earlier chunk is one document). Eagerly this reads the values
    once per forward (every layer gets the same position_ids tensor). Traced: traced_documents."""
    position_ids = _marking_documents(position_ids)
    if position_ids is None or position_ids.shape[-1] == 1:
        return None
    rows = position_ids.reshape(-1, position_ids.shape[-1]).expand(batch_size, -1)
    starts = F.pad(rows.diff(dim=-1) != 1, (1, 0), value=True).reshape(-1)
    if compiling():
        return traced_documents(starts, batch_size, _PACKED_ROWS_UNDER_COMPILE)
    return _once_per_forward("packed", position_ids, batch_size, lambda: documents(starts, batch_size))


def _as_int(x) -> int:
    return int(x.item()) if isinstance(x, torch.Tensor) else int(x)


def _longest(max_q, max_k):
    """The collator's max lengths as one bound. Tensors are read on the host, except under torch.compile, where
    that read would break the graph: None then, and the op reads cu_seqlens inside its body instead."""
    if compiling() and (isinstance(max_q, torch.Tensor) or isinstance(max_k, torch.Tensor)):
        return None
    return max(_as_int(max_q), _as_int(max_k))


def _check_prefix_window(kw: dict, longest) -> None:
    """peft keeps a prefix in the KV cache at positions 0..P-1, where a sliding window hides it from the queries
    from position `window` on; fastft's op shows it to every query. Exact while no query is that far (P + the
    longest sequence <= window), refused beyond (`longest` None, under torch.compile, is not checked)."""
    window, prefix = kw.get("window"), kw.get("prefix_k")
    if window is None or prefix is None or longest is None:
        return
    P = prefix.shape[1]
    if P + longest > window:
        raise ValueError(f"attn_implementation='fastft': prefix tuning on a sliding-window model: {P} virtual tokens "
                         f"+ a {longest}-token sequence pass the window of {window} tokens, past which peft's prefix "
                         "is no longer attended; keep sequences within window - num_virtual_tokens tokens, or use "
                         "peft's own prefix tuning")


def _cached_length(key, position_ids, prefix) -> int:
    """How far the sequence reaches with a KV cache: the last query's position + 1 (a static cache's key slots run
    past it), counted after the prefix, which the prefix room's positions start at; the key count otherwise."""
    if prefix is None or position_ids is None or compiling():
        return key.shape[2]
    return int(position_ids.max()) + 1 - prefix[0].shape[1]


def _varlen(q, k, v, cu, max_len, **kw):
    """(B, S, H, D) packed rows -> (B·S, H, D) documents -> back."""
    _check_prefix_window(kw, max_len)
    out = flash_attention(q.reshape(-1, *q.shape[-2:]), k.reshape(-1, *k.shape[-2:]), v.reshape(-1, *v.shape[-2:]),
                          cu_seqlens=cu, max_seqlen=max_len, backend=_backend, **kw)
    return out.view(q.shape)


def _unpadded(q, k, v, attention_mask, **kw):
    """Right- or left-padded batch (q_len == kv_len): run only the kept tokens, as packed documents. A row whose
    kept tokens have padding between them (prompt tuning's virtual tokens, then a left-padded row) under a sliding
    window takes SDPA: packed, the window would count kept tokens, not row positions, as the model's masks do."""
    B, S = attention_mask.shape
    keep, cu, longest, reach, gaps, edge, seen = _once_per_forward(
        "unpadded", attention_mask, (kw.get("window"), kw.get("prefix_k") is None),
        lambda: _unpadding(attention_mask.bool(), kw))
    _check_prefix_window(kw, reach)
    if gaps and kw.get("window") is not None:
        prefix = (kw["prefix_k"], kw["prefix_v"]) if kw.get("prefix_k") is not None else None
        return _sdpa_fallback(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attention_mask,
                              kw.get("softmax_scale"), kw["causal"], kw["window"], prefix)
    flat = [t.reshape(B * S, *t.shape[-2:]).index_select(0, keep) for t in (q, k, v)]
    out = flash_attention(*flat, cu_seqlens=cu, max_seqlen=longest, backend=_backend, **kw)
    full = out.new_zeros(B * S, *out.shape[-2:]).index_copy(0, keep, out)
    if edge.numel():
        full = full.index_copy(0, edge, _edge_attention(q, k, v, edge, seen, kw))
    return full.view(B, S, *out.shape[-2:])


def _padded_queries_as_unpadded(out, mask, window):
    """SDPA's output (B, S, H, D) with the padded queries _unpadded leaves at zero zeroed, traced (no read of the
    mask), so a compiled model gives what the eager one gives: zeros but right before a kept token (_edge_queries,
    SDPA's value there), and SDPA's output everywhere when a row's kept tokens have gaps under a window."""
    before_kept = F.pad(mask[:, 1:], (0, 1), value=False)
    keep = mask | before_kept
    if window is not None:
        keep = keep | (_kept_runs(mask) > 1).any()
    return torch.where(keep[:, :, None, None], out, out.new_zeros(()))


def _unpadding(mask, kw):
    """(kept token indices, cu_seqlens, longest row, reach: the last kept position + 1 of any row, whether a row has
    padding between kept tokens, _edge_queries) of a boolean (B, S) padding mask."""
    lengths = mask.sum(1, dtype=torch.int32)
    cu = F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
    positions = torch.arange(1, mask.shape[1] + 1, device=mask.device)
    reach = int((mask * positions).amax())
    return (mask.reshape(-1).nonzero().reshape(-1), cu, int(lengths.max()), reach, bool((_kept_runs(mask) > 1).any()),
            *_edge_queries(mask, kw))


def _kept_runs(mask):
    """Runs of kept tokens per row of a boolean (B, S) padding mask (more than 1: padding between kept tokens)."""
    return (mask[:, 1:] & ~mask[:, :-1]).sum(1) + mask[:, 0]


def _edge_queries(mask, kw):
    """(flat indices, (n, S) keys seen) of the padded queries SDPA would not give zeros that matter: those right
    before a kept token (their output predicts its label: a left-padded row's first real token) that see keys: a
    prefix (prefix tuning), or kept tokens before the padding (prompt tuning's virtual tokens). Other padded
    queries feed nothing that is trained and stay zeros."""
    B, S = mask.shape
    b, t = (~mask[:, :-1] & mask[:, 1:]).nonzero(as_tuple=True)
    left, right = mask_bounds(True, kw.get("window"))
    d = t[:, None] - torch.arange(S, device=mask.device)[None, :]
    seen = mask[b] & (d <= left) & (d >= -right)
    if kw.get("prefix_k") is None:
        some = seen.any(1)
        b, t, seen = b[some], t[some], seen[some]
    return b * S + t, seen


def _edge_attention(q, k, v, edge, seen, kw):
    """_edge_queries' outputs as SDPA computes them: each query over its row's keys it sees, and the prefix."""
    B, S, H, D = q.shape
    rows = edge // S
    keys, values = k[rows], v[rows]  # (n, S, KV, D)
    prefix_k = kw.get("prefix_k")
    if prefix_k is not None:  # (1, P, KV, D), seen by every query
        n, P = rows.numel(), prefix_k.shape[1]
        keys, values = (torch.cat([p.to(t.dtype).expand(n, -1, -1, -1), t], dim=1)
                        for p, t in zip((prefix_k, kw["prefix_v"]), (keys, values)))
        seen = torch.cat([seen.new_ones(n, P), seen], dim=1)
    out = F.scaled_dot_product_attention(
        q.reshape(B * S, H, D)[edge][:, :, None], keys.transpose(1, 2), values.transpose(1, 2),
        attn_mask=seen[:, None, None, :], scale=kw.get("softmax_scale"), enable_gqa=gqa_flag(H, k.shape[2]))
    return out[:, :, 0]


def _sdpa_fallback(query, key, value, mask, scaling, is_causal, window=None, prefix=None, position_ids=None):
    """Masks the kernel does not express (custom 4-D masks, padded decoding): torch SDPA with an explicit mask,
    the 2-D padding mask combined with the causal/window one (fastft.ops.attention.visible_mask). A fastft
    prefix (prefix_k, prefix_v), each (1, P, KV, D), goes in front of the keys, visible to every query.
    position_ids (self-attention under torch.compile, whose graph cannot read the mask): the documents they hold
    are kept apart when the mask has no padding, as eagerly (where that mask becomes None: _packed_documents)."""
    n_q, n_k = query.shape[2], key.shape[2]
    position_ids = _marking_documents(position_ids)
    if mask is not None and mask.dim() == 2:
        if position_ids is not None:
            rows = position_ids.reshape(-1, n_k).expand(mask.shape[0], -1)
            document = F.pad(rows.diff(dim=-1) != 1, (1, 0), value=True).cumsum(-1)
            apart = (document[:, :, None] != document[:, None, :]) & mask.bool().all()  # padded: one document a row
        mask = mask[:, None, None, -n_k:].bool()
        if position_ids is not None:
            mask = mask & ~apart[:, None]
    if is_causal or window is not None:
        visible = visible_mask(n_q, n_k, is_causal, window, query.device)
        mask = visible if mask is None else mask & visible
    if prefix is not None:
        B, P = key.shape[0], prefix[0].shape[1]
        key, value = (torch.cat([p.transpose(1, 2).expand(B, -1, -1, -1).to(key.dtype), t], dim=2)
                      for p, t in zip(prefix, (key, value)))
        if mask is not None:  # prefix columns: seen (True, or 0 added to a float mask)
            seen = mask.new_ones if mask.dtype == torch.bool else mask.new_zeros
            mask = torch.cat([seen(*mask.shape[:-1], P), mask], dim=-1)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling,
                                         enable_gqa=gqa_flag(query.shape[1], key.shape[1]))
    return out.transpose(1, 2)


# attention-interface keywords that change the scores: the kernels have no term for them
_SCORE_TERMS = ("position_bias", "sinks", "indices", "block_indices")


def fastft_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                             sliding_window=None, softcap=None, is_causal=None, **kwargs):
    """transformers attention interface: query (B, H, S, D), key/value (B, KV, S_k, D) -> ((B, S, H, D), None)."""
    if dropout:
        raise ValueError(f"attn_implementation='fastft' has no attention dropout (got dropout={dropout}); set the "
                         "model's attention_dropout to 0")
    if softcap is not None or kwargs.get("s_aux") is not None:
        raise ValueError("attn_implementation='fastft' supports neither logit softcapping nor attention sinks; "
                         "use 'sdpa' or 'eager' for this model")
    if kwargs.get("output_attentions"):  # the kernels never form the weights: none are returned
        warnings.warn("attn_implementation='fastft' returns no attention weights (output_attentions=True); use "
                      "'eager' for them", stacklevel=2)
    extra = [name for name in _SCORE_TERMS if kwargs.get(name) is not None]
    if extra:  # dropping them would change the scores silently (T5 without its relative position bias)
        raise ValueError(f"attn_implementation='fastft' cannot add {', '.join(extra)} to the attention scores "
                         "(it supports Llama-style attention); use 'sdpa' or 'eager' for this model")
    _check_not_chunked(module, key.shape[2])
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if sliding_window is None and is_causal:
        sliding_window = _masked_window(module)
    if not is_causal and sliding_window is not None:
        sliding_window = bidirectional_window(module, sliding_window)
    kw = dict(causal=bool(is_causal), softmax_scale=scaling, window=sliding_window)
    prefix = kwargs.get("fastft_prefix")
    if prefix is None and not compiling() and getattr(_prefix_state, "on", False):  # eager: no thread state traced
        raise ValueError(f"fastft prefix tuning: {type(module).__name__} was called without the prefix (its "
                         "decoder layer does not pass keyword arguments on to the attention), so the prefix would "
                         "be ignored; use peft's own prefix tuning for this model")
    if prefix is not None:
        prefix = prefix[module.layer_idx]
        kw["prefix_k"], kw["prefix_v"] = prefix
    if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 4:
        _check_prefix_window(kw, _cached_length(key, kwargs.get("position_ids"), prefix))
        return _sdpa_fallback(query, key, value, attention_mask, scaling, False, prefix=prefix), None
    # (B, H, S, D) -> (B, S, H, D) views: the kernels take any token/head strides
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
    B = q.shape[0]
    q, k, v, fkw, v_dim = _kernel_head_dims(q, k, v, kw)

    if attention_mask is not None:
        # non-causal: padded queries still see the real keys; traced: unpadding reads the mask (a graph break), so
        # SDPA takes the mask as transformers' sdpa does while tracing
        if q.shape[1] != k.shape[1] or not is_causal or compiling():
            _check_prefix_window(kw, _cached_length(key, kwargs.get("position_ids"), prefix))
            packed = kwargs.get("position_ids") if compiling() and q.shape[1] == k.shape[1] else None
            out = _sdpa_fallback(query, key, value, attention_mask, scaling, is_causal, sliding_window, prefix,
                                 packed)
            if compiling() and q.shape[1] == k.shape[1] and is_causal and attention_mask.dim() == 2:
                out = _padded_queries_as_unpadded(out, attention_mask.bool(), sliding_window)
            return out, None
        return _cropped(_unpadded(q, k, v, attention_mask, **fkw), v_dim), None

    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    max_q, max_k = kwargs.get("max_length_q"), kwargs.get("max_length_k")
    if all(x is not None for x in (cu_q, cu_k, max_q, max_k)):
        # one set of boundaries for queries and keys (self-attention); comparing values would sync every layer
        if cu_q.shape != cu_k.shape:
            raise ValueError("attn_implementation='fastft': packed sequences need cu_seq_lens_q == cu_seq_lens_k")
        return _cropped(_varlen(q, k, v, cu_q.to(torch.int32), _longest(max_q, max_k), **fkw), v_dim), None

    packed, position_ids = None, kwargs.get("position_ids")
    if q.shape[1] == k.shape[1] and position_ids is not None:
        packed = _packed_documents(position_ids, B)
    elif q.shape[1] == k.shape[1] and is_causal:  # GPT-BigCode's layers get no position_ids: the mask's documents
        packed = documents_from_mask(module, B * q.shape[1])
    if packed is not None:
        return _cropped(_varlen(q, k, v, *packed, **fkw), v_dim), None

    _check_prefix_window(kw, k.shape[1])
    return _cropped(flash_attention(q, k, v, backend=_backend, **fkw), v_dim), None


def _kernel_head_dims(q, k, v, kw):
    """(q, k, v, kw, v_dim) as the kernels take them: one head_dim for q, k and v, a multiple of 8 in [16, 256].
    MLA attention (DeepSeek-V2/V3, Kimi-K2, MiniCPM3: q/k 192, v 128) and head sizes off that grid (18, 20, 4) are
    zero-padded to the next size the kernels take: exact, zero q/k columns add nothing to the scores and zero v
    columns give zero output columns, cropped after (`_cropped`); the softmax scale stays the q/k head dim's. As
    transformers' FlashAttention integration pads v for MLA. v_dim None: nothing padded."""
    d_qk, d_v = q.shape[-1], v.shape[-1]
    if max(d_qk, d_v) > MAX_HEAD_DIM:  # named here: the kernels would name the padded size, not the model's
        raise ValueError(f"fastft attention: the model's head_dim is {max(d_qk, d_v)} (q/k {d_qk}, v {d_v}); the "
                         f"kernels take head sizes up to {MAX_HEAD_DIM}: load the model with "
                         "attn_implementation='sdpa' or 'eager'")
    target = max(16, -(-max(d_qk, d_v) // 8) * 8)
    if d_qk == d_v == target:
        return q, k, v, kw, None
    kw = dict(kw)
    if kw.get("softmax_scale") is None:
        kw["softmax_scale"] = d_qk ** -0.5

    def pad(t):
        return t if t.shape[-1] == target else F.pad(t, (0, target - t.shape[-1]))

    for name in ("prefix_k", "prefix_v"):
        if kw.get(name) is not None:
            kw[name] = pad(kw[name])
    return pad(q), pad(k), pad(v), kw, d_v


def _cropped(out, v_dim):
    """The attention output with _kernel_head_dims' zero columns cut off (out itself when nothing was padded)."""
    return out if v_dim is None or out.shape[-1] == v_dim else out[..., :v_dim]


def _masked_window(module):
    """The sliding window a model's own masks apply to this layer when its attention module does not hand
    `sliding_window` to the interface (Qwen2-MoE, PhiMoE: eager and sdpa see the window in the mask, which the
    fastft mask function leaves out): the layer's type where the config lists them, else the window of the causal
    mask the model built this forward (one mask for every layer)."""
    config = getattr(module, "config", None)
    types, layer = getattr(config, "layer_types", None), getattr(module, "layer_idx", None)
    if types is not None and layer is not None and layer < len(types):
        return getattr(config, "sliding_window", None) if types[layer] == "sliding_attention" else None
    return causal_mask_window(config)


def _check_not_chunked(module, n_keys: int) -> None:
    """Llama 4's chunked layers attend within chunks of attention_chunk_size tokens: a mask the kernels do not
    express, which the mask function (given no layer) cannot hand to SDPA either. Exact while the keys fit in one
    chunk; refused beyond."""
    config = getattr(module, "config", None)
    chunk = getattr(config, "attention_chunk_size", None)
    if chunk is None or n_keys <= chunk:
        return
    types = getattr(config, "layer_types", None)
    layer = getattr(module, "layer_idx", None)
    if types is not None and layer is not None and types[layer] != "chunked_attention":
        return
    raise ValueError(f"attn_implementation='fastft' has no chunked attention (attention_chunk_size={chunk}, "
                     f"{n_keys} keys); use 'sdpa' or 'eager' for this model")


def register_attention(backend: str = "auto") -> str:
    """Register `attn_implementation="fastft"` with transformers (idempotent); returns the name.

    backend: as in flash_attention ("auto": Triton on CUDA, torch SDPA elsewhere; "triton" forces the
    kernels, e.g. on the CPU under TRITON_INTERPRET=1).
    """
    global _backend
    if backend not in BACKENDS:
        raise ValueError(f"register_attention: `backend` must be one of {BACKENDS}, got {backend!r}")
    if backend == "triton":
        require_triton("register_attention: backend='triton'", "backend='auto' or 'torch' runs without it")
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    _backend = backend
    AttentionInterface.register(NAME, fastft_attention_forward)
    AttentionMaskInterface.register(NAME, fastft_attention_mask)
    return NAME


register_attention()
