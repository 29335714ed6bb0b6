"""`attn_implementation="fastft"` for transformers models (Llama family): attention through fastft.ops.flash_attention.

Importing this module registers the implementation (and `register_attention()` does it again, harmlessly).
It mirrors transformers' FlashAttention integration:

- the mask function returns None unless the 2-D padding mask has padding, so plain batches run the dense
  causal kernel;
- padded batches are unpadded into packed documents (varlen) and padded back;
- packed batches (rows of concatenated documents, no attention mask) run varlen, with the document
  boundaries taken from `cu_seq_lens_q`/`cu_seq_lens_k` when the collator passes them (see
  fastft.integration.packing), else from `position_ids`, wherever they do not rise by 1, in every row
  (`_packed_documents`), as transformers' FlashAttention-2 path does, with or without a cache or an all-ones
  mask (its sdpa/eager masks separate documents only with neither); models whose layers get no position_ids
  (GPT-BigCode, Persimmon, Whisper's decoder: transformers' FlashAttention-2 mixes their documents) take the
  documents from the mask function transformers builds for packed rows (`_documents_from_mask`);
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

import functools
import threading
import warnings
import weakref

import torch
import torch.nn.functional as F

from fastft.ops.attention import flash_attention, gqa_flag, mask_bounds, visible_mask
from fastft.ops.compiled import compiling
from fastft.ops.shared import BACKENDS, require_triton

NAME = "fastft"
_backend = "auto"


_PACKED_ROWS_UNDER_COMPILE = (
    "attn_implementation='fastft' under torch.compile: position_ids restart inside the rows of a batch of several "
    "rows (packed documents), which the traced graph cannot separate without reading them: pack into one row "
    "(batch 1), pass the collator's cu_seq_lens_q/k with it (fastft.integration.packing.PackingCollator, "
    "DataCollatorWithFlattening(return_flash_attn_kwargs=True)), or run this batch eagerly")
_OVERLAY_UNDER_COMPILE = (
    "attn_implementation='fastft' under torch.compile: this mask lets tokens see later ones (an overlay such as "
    "Gemma 3's bidirectional image blocks) inside transformers' packed-rows mask, which the traced graph cannot "
    "tell from plain packed rows without reading it: pass attention_mask (a 2-D mask of ones will do) or leave "
    "position_ids out for this batch, use attn_implementation='sdpa', or run it eagerly")
# Packed rows for attention calls given no position_ids (_documents_from_mask): set by the mask function at the start
# of a forward, read by that forward's attention calls: (id of the config, the documents: _mask_documents) when the
# mask was for packed rows without a padding mask (traced, for every mask with position_ids: torch.compile cannot
# read whether rows restart); None otherwise. Eager attention reads its thread's note (forwards may run at once in
# several threads). Traced attention reads "last" of a dict, not a ContextVar or a thread-local: dynamo traces a
# dict's reads and writes (the others would break the graph); within one compiled forward the value flows in the
# graph, while a compiled attention under an eager mask (regional compilation) reads the last eager mask's, one a
# process.
_packing_seen: dict[str, tuple | None] = {}
_thread_note = threading.local()
# "bidirectional": (id of the config, the reach of its bidirectional sliding mask: local_size), written by the mask
# function, read by _bidirectional_window (a constant per config: threads write the same value)
_mask_reach: dict[str, tuple] = {}
_memos: dict[str, tuple] = {}  # name -> (weakref to the tensor, (its version, key), result)


def _once_per_forward(name: str, tensor: torch.Tensor, key, compute):
    """compute() (values read on the host: a sync) once per forward rather than once per layer: every layer gets
    the same `tensor` (position_ids, the 2-D padding mask), so the result is kept for it while it lives unchanged
    (same object, same version counter) and `key` (what else the result depends on) is the same. An inference
    tensor has no version counter: computed at every call."""
    version = None if tensor.is_inference() else tensor._version
    memo = _memos.get(name)
    if version is not None and memo is not None and memo[0]() is tensor and memo[1] == (version, key):
        return memo[2]
    result = compute()
    if version is not None:
        _memos[name] = (weakref.ref(tensor), (version, key), result)
    return result


def _packed_documents(position_ids, batch_size: int):
    """(cu_seqlens over the B·S flattened tokens, longest document) when some row holds several documents, else None.

    Documents are found as transformers' masks find them (masking_utils.find_packed_sequence_indices), in every row:
    one starts at a row's first token and wherever the position does not rise by 1 (restarts at 0 or at any other
    value; a row that continues a document from an earlier chunk is one document). Eagerly this reads the values
    once per forward (every layer gets the same position_ids tensor). Traced: _traced_documents."""
    if position_ids is None or position_ids.shape[-1] == 1:
        return None
    rows = position_ids.reshape(-1, position_ids.shape[-1]).expand(batch_size, -1)
    starts = F.pad(rows.diff(dim=-1) != 1, (1, 0), value=True).reshape(-1)
    if compiling():
        return _traced_documents(starts, batch_size, _PACKED_ROWS_UNDER_COMPILE)
    return _once_per_forward("packed", position_ids, batch_size, lambda: _documents(starts, batch_size))


def _traced_documents(starts, batch_size: int, refusal: str):
    """_documents under torch.compile, where a value read would break the graph: a single row (B == 1) gets
    cu_seqlens built in the graph, padded to S + 1 entries with S (empty documents the op drops after reading them
    in its body), and no longest length (the op reads cu_seqlens in its body); rows of B > 1 are taken as unpacked,
    and an in-graph assertion (`refusal`) stops a run whose rows are packed (no read, no sync: fails on the device)."""
    if batch_size != 1:  # separating them would read the values (a sync a layer): refused in the graph instead
        torch._assert_async(~starts.view(batch_size, -1)[:, 1:].any(), refusal)
        return None
    # S as a tensor (index[-1:]), never a number: F.pad(..., value=S) made dynamo specialise on the length, a graph
    # per sequence length until the recompile limit
    index = torch.arange(starts.numel() + 1, device=starts.device)
    last = index[-1:]
    first = torch.sort(torch.where(starts, index[:-1], last)).values
    return torch.cat([first, last]).to(torch.int32), None


def _documents(starts, batch_size: int):
    at = starts.nonzero().reshape(-1).to(torch.int32)
    if at.numel() == batch_size:  # no row holds a second document
        return None
    cu = F.pad(at, (0, 1), value=starts.numel())
    return cu, int(cu.diff().max())


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
    if not is_causal and sliding_window is not None:
        sliding_window = _bidirectional_window(module, sliding_window)
    kw = dict(causal=bool(is_causal), softmax_scale=scaling, window=sliding_window)
    prefix = kwargs.get("fastft_prefix")
    if prefix is not None:
        prefix = prefix[module.layer_idx]
        kw["prefix_k"], kw["prefix_v"] = prefix
    if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 4:
        _check_prefix_window(kw, _cached_length(key, kwargs.get("position_ids"), prefix))
        return _sdpa_fallback(query, key, value, attention_mask, scaling, False, prefix=prefix), None
    # (B, H, S, D) -> (B, S, H, D) views: the kernels take any token/head strides
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
    B = q.shape[0]

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
        return _unpadded(q, k, v, attention_mask, **kw), None

    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    max_q, max_k = kwargs.get("max_length_q"), kwargs.get("max_length_k")
    if all(x is not None for x in (cu_q, cu_k, max_q, max_k)):
        # one set of boundaries for queries and keys (self-attention); comparing values would sync every layer
        if cu_q.shape != cu_k.shape:
            raise ValueError("attn_implementation='fastft': packed sequences need cu_seq_lens_q == cu_seq_lens_k")
        return _varlen(q, k, v, cu_q.to(torch.int32), _longest(max_q, max_k), **kw), None

    packed, position_ids = None, kwargs.get("position_ids")
    if q.shape[1] == k.shape[1] and position_ids is not None:
        packed = _packed_documents(position_ids, B)
    elif q.shape[1] == k.shape[1] and is_causal:  # GPT-BigCode's layers get no position_ids: the mask's documents
        packed = _documents_from_mask(module)
    if packed is not None:
        return _varlen(q, k, v, *packed, **kw), None

    _check_prefix_window(kw, k.shape[1])
    return flash_attention(q, k, v, backend=_backend, **kw), None


def _documents_from_mask(module):
    """Packed rows for a model whose layers pass no position_ids on (GPT-BigCode, Persimmon, Fuyu, Whisper's
    decoder...): the documents the mask function found for this forward (fastft_attention_mask, _mask_documents),
    as _packed_documents gives them, or None. Traced over several rows, where finding them would read values, a
    packed batch stops the run in the graph."""
    seen = _packing_seen.get("last") if compiling() else getattr(_thread_note, "last", None)
    config = getattr(module, "config", None)
    if seen is None or (config is not None and seen[0] != id(config)):
        return None
    documents = seen[1]
    if isinstance(documents, torch.Tensor):  # traced, B > 1: whether some row starts a second document
        torch._assert_async(~documents, (
            f"attn_implementation='fastft' under torch.compile: this batch packs documents into several rows and "
            f"{type(module).__name__} is not given the position_ids, so the traced graph cannot separate them "
            "without reading them: pack into one row (batch 1), pass cu_seq_lens_q/k with it "
            "(fastft.integration.packing.PackingCollator, DataCollatorWithFlattening(return_flash_attn_kwargs=True)), "
            "or run this batch eagerly"))
        return None
    return _eager_documents(documents) if callable(documents) else documents


@torch.compiler.disable  # an eager mask under a compiled attention (regional compilation): read outside the graph
def _eager_documents(documents):
    return documents()


def _bidirectional_window(module, sliding_window: int) -> int:
    """The window of a bidirectional sliding layer as its mask draws it. transformers' bidirectional sliding mask lets
    a token see keys up to `local_size` (the config's sliding_window) away on each side, while a window W passed to
    the op reaches W - 1: ModernBERT passes sliding_window + 1 to its attention, T5Gemma's encoder the
    sliding_window itself (1 short: logits 0.24 off, silently). The mask function notes the mask's reach for the
    config (_mask_reach); the window follows it."""
    reach = _mask_reach.get("bidirectional")
    config = getattr(module, "config", None)
    if reach is None or config is None or reach[0] != id(config):
        return sliding_window
    return reach[1] + 1


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


def _check_uses_the_interface(config) -> None:
    """A decoder whose attention does not go through transformers' attention interface (Bloom, MPT: no attention
    function of the interface is called) still builds its mask through this one: fastft's kernels would never
    run, and the padding-only mask returned here would leave its own attention without causality (logits at
    position 0 changed by later tokens), silently. Refused."""
    if config is None:
        return
    encoder_decoder = bool(getattr(config, "is_encoder_decoder", False))
    refusal = _interface_refusal(getattr(config, "model_type", None), encoder_decoder)
    if refusal:
        raise ValueError(refusal)


# Constant results for torch.compile: dynamo calls these with their (str, bool) arguments instead of tracing into
# them (it ignores functools.lru_cache, with a warning at every compile, and would walk transformers' registries)
_MODEL_TYPE_FACTS: dict = {}


def _per_model_type(fn):
    """fn(*args) computed once per arguments, and a constant to dynamo."""
    @torch.compiler.assume_constant_result
    @functools.wraps(fn)
    def cached(*args):
        key = (fn.__name__, *args)
        if key not in _MODEL_TYPE_FACTS:
            _MODEL_TYPE_FACTS[key] = fn(*args)
        return _MODEL_TYPE_FACTS[key]
    return cached


# decoders whose self-attention module says is_causal=False: their causal mask lives in transformers' 4-D mask, which
# FlashAttention's masks (None or 2-D padding, fastft's too) drop (found by the encoder-decoder registry sweep)
_UNMARKED_CAUSAL = {"pegasus_x": "PegasusXAttention"}


@_per_model_type
def _interface_refusal(model_type, is_encoder_decoder: bool) -> str:
    """_check_uses_the_interface's error message for this model type, "" where it runs."""
    classes = _model_classes(model_type)
    # encoder-decoders (T5) reach fastft's attention function, which checks them itself
    if classes and not is_encoder_decoder and not _dispatches_attention(classes[-1]):
        return (f"attn_implementation='fastft': {classes[-1].__name__} does not run its attention through "
                "transformers' attention interface, so fastft's kernels would not run and its attention would "
                "get FlashAttention's masks, without their causal or padding part; use 'sdpa' or 'eager' for "
                "this model")
    if model_type in _UNMARKED_CAUSAL:
        return (f"attn_implementation='fastft': {_UNMARKED_CAUSAL[model_type]} in the decoder is not marked causal "
                "(transformers takes its causality from the full 4-D mask alone), so its tokens would see later "
                "ones; use 'eager' for this model")
    if any(not getattr(c, "_supports_sdpa", True) and not getattr(c, "_supports_flash_attn", True) for c in classes):
        # their attention reads transformers' full 4-D mask (BigBirdPegasus' and TrOCR's decoders take causality
        # from it alone): the None or padding-only masks of FlashAttention's contract dropped it, silently
        return (f"attn_implementation='fastft': {classes[0].__name__} supports neither SDPA nor "
                "FlashAttention in transformers (its attention needs the full 4-D mask), so its causal "
                "mask would be lost; use 'eager' for this model")
    return ""


def _dispatches_attention(model_class) -> bool:  # read once per model type (_interface_refusal's cache)
    """Whether the model may call an attention function from transformers' interface: its class says so, or its
    modeling code reads ALL_ATTENTION_FUNCTIONS (BioGPT's class flag is False, yet it dispatches)."""
    if getattr(model_class, "_supports_attention_backend", True):
        return True
    import inspect
    import sys

    try:
        return "ALL_ATTENTION_FUNCTIONS" in inspect.getsource(sys.modules[model_class.__module__])
    except (OSError, TypeError, KeyError):  # no source to read: let it run, as before this check
        return True


@functools.lru_cache(maxsize=None)
def _model_classes(model_type) -> tuple:
    """The causal-LM and base model classes transformers maps `model_type` to (the base one last), those that exist.
    A sub-config's type that maps to none (T5Gemma 2's `t5gemma2_decoder`) takes its parent's (`t5gemma2`)."""
    try:
        import transformers
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_MAPPING_NAMES
    except ImportError:
        return ()
    names = (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type), MODEL_MAPPING_NAMES.get(model_type))
    classes = tuple(c for c in (getattr(transformers, name, None) for name in names if isinstance(name, str))
                    if c is not None)
    parent = model_type.rsplit("_", 1)[0] if isinstance(model_type, str) else model_type
    if not classes and parent != model_type and model_type.rsplit("_", 1)[1] in ("encoder", "decoder", "text"):
        return _model_classes(parent)
    return classes


def _supports_flash_mask(config) -> bool:
    """Whether transformers runs this model with FlashAttention's masks (None or 2-D padding), which fastft's
    mask function returns: models it refuses FlashAttention for (Doge's dynamic mask, Llama 4's chunks) get the
    full 4-D mask wherever transformers asks for one."""
    return _flash_mask_type(getattr(config, "model_type", None))


@_per_model_type
def _flash_mask_type(model_type) -> bool:
    return all(getattr(c, "_supports_flash_attn", True) for c in _model_classes(model_type))


def fastft_attention_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None,
                          attention_mask=None, **kwargs):
    """The 2-D padding mask (sliced to the keys), or None when there is no padding: like FlashAttention's.

    A cache whose key slots run past the filled positions (a static cache: kv_offset + kv_length > q_offset +
    q_length) gets transformers' own 4-D boolean mask instead: the kernels align queries to the last key, which is
    not the last filled one there, and the empty slots must not be seen (the interface then runs SDPA on it). So
    does a mask with an overlay (`use_vmap`: transformers' or/and mask functions; also a blockwise overlay composed
    without vmap, _may_see_later_keys: Gemma 3's image tokens seeing each other both ways), which the causal
    kernels would drop, and a mask transformers may not skip on a model it runs without FlashAttention."""
    config = kwargs.get("config")
    _check_uses_the_interface(config)
    # a causal mask transformers may not skip: packed rows (position_ids restarting, no padding mask), an overlay, or
    # a model that always needs one (Doge). Encoders' bidirectional masks always pass allow_is_causal_skip=False
    # (an sdpa argument they do not use): not one of these
    causal = "allow_is_bidirectional_skip" not in kwargs
    unskippable = causal and kwargs.get("allow_is_causal_skip") is False
    # a bidirectional mask transformers may not skip either (T5Gemma 2 concatenates its decoder's self- and
    # cross-attention masks)
    kept = unskippable or (not causal and kwargs.get("allow_is_bidirectional_skip") is False)
    if not causal and kwargs.get("local_size") is not None:  # a bidirectional sliding mask: its reach
        _mask_reach["bidirectional"] = (id(config), kwargs["local_size"])
    # traced with a static cache, the offsets are tensors: comparing them would branch on data (a graph break)
    traced_offsets = compiling() and any(isinstance(x, torch.Tensor) for x in (q_offset, kv_offset))
    if causal:  # read by the attention calls of this forward (_documents_from_mask)
        note = None
        # eagerly: transformers found rows that restart their positions; traced, it wraps every call with
        # position_ids so (whether a row restarts is found in the graph)
        if unskippable and attention_mask is None and not kwargs.get("use_vmap") and q_length == kv_length \
                and not traced_offsets and mask_function is not None and q_length >= 2:
            note = (id(config), _mask_documents(mask_function, batch_size, q_length, q_offset, kwargs.get("device")))
        _packing_seen["last"] = note
        if not compiling():
            _thread_note.last = note
    if traced_offsets or kwargs.get("use_vmap") or kv_offset + kv_length > q_offset + q_length \
            or (kept and not _supports_flash_mask(config)) \
            or (unskippable and _may_see_later_keys(mask_function, batch_size, q_length, q_offset,
                                                    kwargs.get("device"))):
        from transformers.masking_utils import causal_mask_function, sdpa_mask

        passed = {k: v for k, v in kwargs.items() if k in ("device", "local_size", "use_vmap")}
        return sdpa_mask(batch_size, q_length, kv_length, q_offset, kv_offset, mask_function or causal_mask_function,
                         attention_mask, allow_is_causal_skip=False, **passed)
    if attention_mask is None:
        return None
    attention_mask = attention_mask[:, -kv_length:]
    # traced, the values are not read (a graph break per layer, even for all-ones): the interface takes SDPA
    if not compiling() and attention_mask.shape[1] == kv_length and bool(attention_mask.all()):
        return None
    return attention_mask


def _may_see_later_keys(mask_function, batch_size: int, q_length: int, q_offset, device) -> bool:
    """_sees_later_keys eagerly. Traced (its tensor read would break the graph), the mask function's name: an
    `or_masks` composition on the outside (Gemma 3's blockwise overlay) may add later keys, so it gets the full
    mask. One inside an `and_masks` (transformers' packed-rows mask, which under torch.compile wraps every call
    with position_ids and no padding mask) is not seen by name: the same probe runs in the graph then, as an
    assertion that stops the run rather than drop the overlay."""
    if mask_function is None or q_length < 2:
        return False
    if compiling():
        if getattr(mask_function, "__name__", None) == "or_mask":
            return True
        torch._assert_async(~_sees_later_keys(mask_function, batch_size, q_length, q_offset, device),
                            _OVERLAY_UNDER_COMPILE)
        return False
    return bool(_sees_later_keys(mask_function, batch_size, q_length, q_offset, device))


def _mask_documents(mask_function, batch_size: int, q_length: int, q_offset, device):
    """The documents of packed rows as the mask function separates them: one starts at a row's first token and at
    every query that does not see the key right before it (O(S) pairs). Eagerly, a function giving _documents
    once, called only by an attention given no position_ids (the read is a sync). Traced: one row's cu_seqlens
    built in the graph (_traced_documents); over several rows, whether one starts a second document (a 0-dim bool
    tensor, for an in-graph assertion)."""
    def starts():
        seen = _neighbour_seen(mask_function, batch_size, q_length, q_offset, device, -1)
        return F.pad(~seen.expand(batch_size, -1), (1, 0), value=True).reshape(-1)

    if not compiling():
        return functools.cache(lambda: _documents(starts(), batch_size))
    if batch_size != 1:
        return ~_neighbour_seen(mask_function, batch_size, q_length, q_offset, device, -1).all()
    return _traced_documents(starts(), 1, "")


def _sees_later_keys(mask_function, batch_size: int, q_length: int, q_offset, device) -> torch.Tensor:
    """Whether a query sees the key right after it somewhere (a 0-dim bool tensor): an overlay the causal kernels
    would drop, which transformers composes without asking for vmap (Gemma 3's and PaliGemma's image tokens
    attending to each other both ways, blockwise_overlay). Evaluated on the O(S) pairs (q, q + 1) only (plain
    packed rows see no later key)."""
    return _neighbour_seen(mask_function, batch_size, q_length, q_offset, device, 1).any()


def _neighbour_seen(mask_function, batch_size: int, q_length: int, q_offset, device, step: int) -> torch.Tensor:
    """mask_function on the pairs (q, q + step) of every row, (B, S - 1) booleans: index-based, broadcast over
    batch and query as transformers' own mask builders call it."""
    batch = torch.arange(batch_size, device=device)[:, None]
    q = q_offset + torch.arange(max(0, -step), q_length - max(0, step), device=device)[None, :]
    seen = mask_function(batch, torch.zeros((), dtype=torch.long, device=device), q, q + step)
    return torch.as_tensor(seen, device=device)


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
