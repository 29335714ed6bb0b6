"""generate() through the base model with each step's inputs adjusted: how the prompt-learning rooms (prefix,
prompt / P-tuning) add their virtual tokens to transformers' own generation loop."""
from __future__ import annotations

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


def generate_adjusting_inputs(base: nn.Module, adjust: Callable[[dict], dict], args: tuple, kwargs: dict):
    """`base.generate(*args, **kwargs)`, each step's model inputs (what `prepare_inputs_for_generation` returns)
    passed through `adjust` first. The wrapper is an instance attribute for the call only."""
    prepare = base.prepare_inputs_for_generation

    # transformers reads this signature: generate(inputs_embeds=...) needs the parameter named, and **kwargs
    def adjusted(*args, inputs_embeds=None, **kwargs):
        return adjust(prepare(*args, inputs_embeds=inputs_embeds, **kwargs))

    base.prepare_inputs_for_generation = adjusted
    try:
        return base.generate(*args, **kwargs)
    finally:
        del base.prepare_inputs_for_generation
