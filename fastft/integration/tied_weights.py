"""Merging into a weight another module shares (tied embeddings) without changing that module."""
from __future__ import annotations

import warnings

from peft import PeftModel
from torch import nn


def untie_adapted_weights(model: PeftModel) -> None:
    """An adapted layer whose weight is tied to another module's (lm_head and the embeddings of a tied model) gets
    its own copy before the merge: merged in place, the shared weight would carry the lm_head's ΔW into the
    embeddings too (peft's merge changed such a model's logits by ~100%). The config then says untied, so the merged
    model saves and loads both matrices."""
    owners: dict[int, int] = {}
    for _, param in model.named_parameters(remove_duplicate=False):
        owners[id(param)] = owners.get(id(param), 0) + 1
    untied = []
    for name, module in model.named_modules():
        base = module.get_base_layer() if callable(getattr(module, "get_base_layer", None)) else None
        weight = getattr(base, "weight", None) if base is not module else None
        if isinstance(weight, nn.Parameter) and owners.get(id(weight), 0) > 1:
            base.weight = nn.Parameter(weight.detach().clone(), requires_grad=weight.requires_grad)
            untied.append(name)
    if untied:
        config = model.get_base_model().config
        for cfg in {id(c): c for c in (config, config.get_text_config())}.values():
            cfg.tie_word_embeddings = False
        warnings.warn(f"fastft merge: {', '.join(untied)} shared its weight with another module (tied "
                      "embeddings): merged into a copy of it, so the merged model keeps the adapted model's outputs "
                      "and holds both matrices (tie_word_embeddings=False)", stacklevel=4)
