"""generate() through the base model with each step's inputs adjusted: how the prompt-learning rooms (prefix,
prompt / P-tuning) add their virtual tokens to transformers' own generation loop."""
from __future__ import annotations

import threading
from contextvars import ContextVar
from typing import Callable

import torch
from torch import nn

# transformers decoders that, given no position_ids, count positions over the attention mask (OPTDecoder:
# cumsum(mask) * mask - 1); the others count from the cache (Llama family; BioGPT too, though its position embedding
# could read the mask, its decoder always hands it positions)
MASK_POSITION_MODEL_TYPES = frozenset({"opt"})


def counts_positions_over_mask(model: nn.Module) -> bool:
    return getattr(getattr(model, "config", None), "model_type", None) in MASK_POSITION_MODEL_TYPES


def positions_over_mask(mask: torch.Tensor, before: int = 0) -> torch.Tensor:
    """OPT's positions for a (batch, length) attention mask, `before` kept tokens not in it (a prefix) counted
    first: cumsum over the kept tokens, padding at -1."""
    mask = mask.long()
    return (before + mask.cumsum(1)) * mask - 1


class NoContinuousBatching:
    """For the prompt-learning PeftModels: transformers' continuous batching (generate_batch, a "paged" cache) runs the
    base model's own forward per request, without the virtual tokens, so its answers would be the base model's
    (peft's are): refused, naming generate()."""

    def generate_batch(self, *args, **kwargs):
        raise refuse_continuous_batching(self, "generate_batch")

    def init_continuous_batching(self, *args, **kwargs):
        raise refuse_continuous_batching(self, "init_continuous_batching")

    def continuous_batching_context_manager(self, *args, **kwargs):
        raise refuse_continuous_batching(self, "continuous_batching_context_manager")


def refuse_continuous_batching(model: nn.Module, what: str) -> NotImplementedError:
    method = type(getattr(model, "active_peft_config", None)).__name__.replace("Config", "")
    return NotImplementedError(f"{what}: transformers' continuous batching runs the base model without the adapter's "
                               f"virtual tokens ({method}), so its answers would be the base model's; use generate() "
                               "(batched, left-padded), or merge a LoRA-type adapter instead")


def paged_cache_asked(base: nn.Module, kwargs: dict) -> bool:
    """Whether a generate() call asks for transformers' continuous batching ("paged" caches)."""
    settings = kwargs.get("generation_config") or getattr(base, "generation_config", None)
    asked = kwargs.get("cache_implementation") or getattr(settings, "cache_implementation", None)
    return isinstance(asked, str) and "paged" in asked


_ADJUST: ContextVar = ContextVar("fastft_generation_adjust", default=None)  # this thread's generate call's
_LOCK = threading.Lock()
_INSTALLED: dict[int, list] = {}  # id(base) -> [generate calls in flight, what the instance held before, or _NONE]
_NONE = object()


def generate_adjusting_inputs(base: nn.Module, adjust: Callable[[dict], dict], args: tuple, kwargs: dict):
    """`base.generate(*args, **kwargs)`, each step's model inputs (what `prepare_inputs_for_generation` returns)
    passed through `adjust` first.

    The wrapper is an instance attribute while calls are in flight, installed by the first and removed by the last;
    it reads the adjustment of the calling thread's own call (a ContextVar): threads generating from one model at
    once each get theirs (a wrapper per call wrapped another thread's, and one thread's removal left the other's
    steps without their virtual tokens)."""
    token = _ADJUST.set(adjust)
    with _LOCK:
        state = _INSTALLED.setdefault(id(base), [0, _NONE])
        if state[0] == 0:
            state[1] = base.__dict__.get("prepare_inputs_for_generation", _NONE)
            base.prepare_inputs_for_generation = _adjusting(base.prepare_inputs_for_generation)
        state[0] += 1
    try:
        return base.generate(*args, **kwargs)
    finally:
        with _LOCK:
            state[0] -= 1
            if state[0] == 0:
                del _INSTALLED[id(base)]
                if state[1] is _NONE:
                    del base.prepare_inputs_for_generation
                else:
                    base.prepare_inputs_for_generation = state[1]
        _ADJUST.reset(token)


def _adjusting(prepare: Callable) -> Callable:
    # transformers reads this signature: generate(inputs_embeds=...) needs the parameter named, and **kwargs
    def adjusted(*args, inputs_embeds=None, **kwargs):
        inputs = prepare(*args, inputs_embeds=inputs_embeds, **kwargs)
        adjust = _ADJUST.get()
        return inputs if adjust is None else adjust(inputs)

    return adjusted
