"""The mask function of `attn_implementation="fastft"` (fastft.integration.attention) and what it leaves for the
attention calls of a forward.

transformers asks the mask function for each mask a forward needs; fastft's returns FlashAttention's masks (None, or
the 2-D padding mask) where the kernels draw the mask themselves, and transformers' full 4-D mask where they cannot
(an overlay, a static cache's empty slots, models transformers runs without FlashAttention). What the attention
calls cannot see on their own it notes for them: the documents of packed rows (for models whose layers get no
position_ids) and a bidirectional sliding mask's reach. It also refuses models whose attention would not run
through fastft, or would lose its causality.
"""
from __future__ import annotations

import functools
import threading

import torch
import torch.nn.functional as F

from fastft.ops.compiled import compiling

_OVERLAY_UNDER_COMPILE = (
    "attn_implementation='fastft' under torch.compile: this mask lets tokens see later ones (an overlay such as "
    "Gemma 3's bidirectional image blocks) inside transformers' packed-rows mask, which the traced graph cannot "
    "tell from plain packed rows without reading it: pass attention_mask (a 2-D mask of ones will do) or leave "
    "position_ids out for this batch, use attn_implementation='sdpa', or run it eagerly")
# Packed rows for attention calls given no position_ids (documents_from_mask): noted by the mask function at the start
# of a forward, per model (_eager_key eagerly, _traced_key for traced readers; "last": any model, for a layer without
# a config): (the tokens B·S, the documents: _mask_documents, when the mask was for packed rows without a padding mask
# (traced, for every mask with position_ids: torch.compile cannot read whether rows restart); else None). Eager
# attention reads its thread's notes (forwards may run at once in several threads) — but gradient checkpointing's
# recompute of a layer in the backward reads _recompute_notes: the notes of the last forward of its model with
# gradients on, kept apart because whatever ran in between (a distillation teacher's forward, a no-grad reference
# forward of the same model) replaced the note every forward wrote (gradients 10-17 off at scale 40-80, silently), and
# process-wide because on a GPU the backward runs on autograd's device threads. Traced attention reads _packing_seen, a
# dict, not a ContextVar or a thread-local: dynamo traces a dict's reads and writes (the others would break the
# graph); within one compiled forward the note flows in the graph. An eager mask writes _EAGER_MASK there instead of
# its note: a compiled attention under it (regional compilation) then reads, outside the graph, the notes an eager one
# reads, its own forward's by the config's id (_eager_documents_from_mask). The traced key is shared by alike models,
# so the note itself there was another model's after its forward (a student's, a teacher's) between a forward and its
# checkpointed backward: gradients 34 off at scale 65, silently. (Keyed by grad mode too, it lost the documents in
# reentrant checkpointing, whose forward runs without gradients under a mask built with them: 28 off.) Left: an alike
# model compiled whole (its mask traced) run in that window replaces the mark with its traced note, which the
# recompute reads (use_reentrant=False stops with a CheckpointError, the documents' shapes differing; reentrant:
# gradients off).
_packing_seen: dict = {}
_EAGER_MASK = "eager mask"  # in _packing_seen: this model's last mask was built eagerly
_recompute_notes: dict = {}
_thread_note = threading.local()
# ("bidirectional", a config's key): the reach of its bidirectional sliding mask (local_size), read by
# bidirectional_window; ("causal", a config's key): its causal mask's window or None, read by causal_mask_window. Each
# a constant of its model, so one per model: a single slot for every model lost a window to another model's forward
# (another thread's, or a teacher's before a checkpointed backward). Written under both keys eagerly (a compiled
# attention may read an eager mask's), under the traced key when traced (an eager reader falls back to it)
_mask_reach: dict[tuple, int | None] = {}


def _note_reach(key: tuple, reach: int | None) -> None:
    """_mask_reach[key] = reach, written only when it changes (an absent key reads None): torch.compile guards on
    the dict, and a write at every traced forward made the second call of a compiled model compile again."""
    if _mask_reach.get(key) != reach:
        _mask_reach[key] = reach


def _thread_notes() -> dict:
    notes = getattr(_thread_note, "notes", None)
    if notes is None:
        notes = _thread_note.notes = {}
    return notes


def _recomputing() -> bool:
    """Inside a backward: a layer run there is gradient checkpointing's recompute (reentrant or not)."""
    return torch._C._current_graph_task_id() != -1


def forwards_seen() -> int:
    """How many masks this thread's forwards built (eagerly): a forward's first attention call sees a new count, so
    what is kept for one forward (fastft.integration.attention._once_per_forward) is computed again at the next."""
    return getattr(_thread_note, "masks", 0)


def causal_mask_window(config) -> int | None:
    """The sliding window of the causal mask the model of `config` built (None: no window, or no mask seen)."""
    return _reach("causal", config)


def _key(config):
    """A config's key in the notes: _traced_key under torch.compile, _eager_key otherwise."""
    return _traced_key(config) if compiling() else _eager_key(config)


def _eager_key(config):
    """The config's id: the notes of two models stay apart, however alike (threads, a teacher and its student)."""
    return "none" if config is None else id(config)


# the settings a traced key is made of: plain values, each an equality guard for dynamo (no float: a NaN never equals
# itself, and a guard on it would fail at every call)
_KEYED_SETTINGS = (bool, int, str, type(None))


def _traced_key(config):
    """The config's class and its plain settings, not its id: dynamo guards on the id of an object whose id() a
    graph reads, so every new model of a process compiled again, and past its recompile limit (8) the next ran
    eagerly, silently; on values, a model alike in every setting reuses the graph. Two such models share their
    traced notes: a reach is the same for both (it follows the settings), packed documents flow inside one compiled
    forward, and a compiled attention under an eager mask reads its own model's outside the graph (_EAGER_MASK), in a
    checkpointed recompute too, after an alike model's forward (left: one compiled whole, see _packing_seen). Not
    id(None) either: torch 2.11's dynamo (the GPU machine's) cannot trace id() of a constant, and an attention module
    without a config stopped the trace."""
    if config is None:
        return "none"
    return (type(config).__name__, *((k, v) for k, v in vars(config).items() if isinstance(v, _KEYED_SETTINGS)))


def _reach(kind: str, config) -> int | None:
    """The noted reach of `kind` ("causal", "bidirectional") for the model of `config`: eagerly its own note, or,
    where its mask was traced and its attention runs eagerly, the traced one."""
    reach = _mask_reach.get((kind, _key(config)))
    if reach is None and not compiling():
        reach = _mask_reach.get((kind, _traced_key(config)))
    return reach


def _note_reaches(kind: str, config, reach: int | None) -> None:
    """_note_reach under the config's traced key, and eagerly under its own too."""
    for key in (_traced_key(config),) if compiling() else (_traced_key(config), _eager_key(config)):
        _note_reach((kind, key), reach)


def traced_documents(starts, batch_size: int, refusal: str):
    """documents() under torch.compile, where a value read would break the graph: a single row (B == 1) gets
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


def documents(starts, batch_size: int):
    """(cu_seqlens over the B·S flattened tokens, longest document) from document starts (a bool per token, every
    row's first token among them), or None when no row holds a second document. Reads the values (a sync)."""
    at = starts.nonzero().reshape(-1).to(torch.int32)
    if at.numel() == batch_size:  # no row holds a second document
        return None
    cu = F.pad(at, (0, 1), value=starts.numel())
    return cu, int(cu.diff().max())


def documents_from_mask(module, tokens: int):
    """Packed rows for a model whose layers pass no position_ids on (GPT-BigCode, Persimmon, Fuyu, Whisper's
    decoder...): the documents the mask function found for this forward (fastft_attention_mask, _mask_documents),
    as the attention's _packed_documents gives them, or None. `tokens`: the call's B·S. Traced over several rows,
    where finding them would read values, a packed batch stops the run in the graph. Recomputed by gradient
    checkpointing, a note of other tokens is another forward's of this model, run before this backward: refused."""
    config = getattr(module, "config", None)
    key = _key(config) if config is not None else "last"
    recomputing = not compiling() and _recomputing()
    seen = (_packing_seen.get(key) if compiling()
            else (_recompute_notes if recomputing else _thread_notes()).get(key))
    if seen is None:
        return None
    if isinstance(seen, str):  # _EAGER_MASK: the mask ran eagerly around this compiled attention
        return _eager_documents_from_mask(module, tokens)
    noted, found = seen
    if recomputing and noted != tokens:
        raise ValueError(f"attn_implementation='fastft': {type(module).__name__} was called on {tokens} tokens but "
                         f"the last forward of its model with gradients on masked {noted}: gradient checkpointing "
                         "recomputing it after another forward of the model, whose packed documents it would read. "
                         "Run the backward before the next forward with gradients on, or pass position_ids with "
                         "the packed rows (fastft.integration.packing.PackingCollator)")
    if found is None:
        return None
    if isinstance(found, torch.Tensor):  # traced, B > 1: whether some row starts a second document
        torch._assert_async(~found, (
            f"attn_implementation='fastft' under torch.compile: this batch packs documents into several rows and "
            f"{type(module).__name__} is not given the position_ids, so the traced graph cannot separate them "
            "without reading them: pack into one row (batch 1), pass cu_seq_lens_q/k with it "
            "(fastft.integration.packing.PackingCollator, DataCollatorWithFlattening(return_flash_attn_kwargs=True)), "
            "or run this batch eagerly"))
        return None
    return found() if callable(found) else found  # eagerly: the mask's documents, found at the first call


@torch.compiler.disable
def _eager_documents_from_mask(module, tokens: int):
    """documents_from_mask run eagerly, for a compiled attention under an eager mask: outside the graph it reads
    the notes of its own forward, by the config's id (the recompute's in a checkpointed backward), which dynamo would
    guard (a graph per model) were they read in it."""
    return documents_from_mask(module, tokens)


def bidirectional_window(module, sliding_window: int) -> int:
    """The window of a bidirectional sliding layer as its mask draws it. transformers' bidirectional sliding mask lets
    a token see keys up to `local_size` (the config's sliding_window) away on each side, while a window W passed to
    the op reaches W - 1: ModernBERT passes sliding_window + 1 to its attention, T5Gemma's encoder the
    sliding_window itself (1 short: logits 0.24 off, silently). The mask function notes the mask's reach for the
    config (_mask_reach); the window follows it."""
    config = getattr(module, "config", None)
    reach = _reach("bidirectional", config) if config is not None else None
    return sliding_window if reach is None else reach + 1


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
        _note_reaches("bidirectional", config, kwargs["local_size"])
    # the window of the causal mask a model without layer_types built (None: no window). Only there: a model with
    # layer_types builds a full and a sliding mask each forward, and a note flipping between them made such a model
    # (Qwen2, Qwen2-MoE on attn_implementation='fastft') compile twice; its layers read their window from the types
    if causal and getattr(config, "layer_types", None) is None:
        _note_reaches("causal", config, kwargs.get("local_size"))
    if not compiling():
        _thread_note.masks = forwards_seen() + 1
    # traced with a static cache, the offsets are tensors: comparing them would branch on data (a graph break)
    traced_offsets = compiling() and any(isinstance(x, torch.Tensor) for x in (q_offset, kv_offset))
    if causal:  # read by the attention calls of this forward (documents_from_mask)
        found = None
        # eagerly: transformers found rows that restart their positions; traced, it wraps every call with
        # position_ids so (whether a row restarts is found in the graph)
        if unskippable and attention_mask is None and not kwargs.get("use_vmap") and q_length == kv_length \
                and not traced_offsets and mask_function is not None and q_length >= 2:
            found = _mask_documents(mask_function, batch_size, q_length, q_offset, kwargs.get("device"))
        note = (batch_size * q_length, found)  # the tokens too: a recompute checks it reads its own forward's
        # read by traced attention: the note, or an eager mask's _EAGER_MASK where it found documents (the attention
        # reads the eager books then)
        for key in (_traced_key(config), "last"):
            held = _packing_seen.get(key)
            if compiling():
                # a note that finds no documents (as an absent one reads) only replaces one that did, or the mark:
                # torch.compile guards on the dict, and a write at every traced forward compiled the second call again
                if found is not None or isinstance(held, str) or (held is not None and held[1] is not None):
                    _packing_seen[key] = note
            elif found is not None or (isinstance(held, str) and key != "last"):
                # kept after an alike model's forward without documents: the recompute of one with them reads it
                # ("last", any model's, is not: a later compiled forward replacing it would compile again)
                _packing_seen[key] = _EAGER_MASK
            else:
                _packing_seen[key] = note
        if not compiling():
            for key in (_eager_key(config), "last"):
                _thread_notes()[key] = note
                if torch.is_grad_enabled():  # a forward whose layers checkpointing may recompute
                    _recompute_notes[key] = note
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
    every query that does not see the key right before it (O(S) pairs). Eagerly, a function giving documents()
    once, called only by an attention given no position_ids (the read is a sync). Traced: one row's cu_seqlens
    built in the graph (traced_documents); over several rows, whether one starts a second document (a 0-dim bool
    tensor, for an in-graph assertion)."""
    def starts():
        seen = _neighbour_seen(mask_function, batch_size, q_length, q_offset, device, -1)
        return F.pad(~seen.expand(batch_size, -1), (1, 0), value=True).reshape(-1)

    if not compiling():
        return functools.cache(lambda: documents(starts(), batch_size))
    if batch_size != 1:
        return ~_neighbour_seen(mask_function, batch_size, q_length, q_offset, device, -1).all()
    return traced_documents(starts(), 1, "")


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
