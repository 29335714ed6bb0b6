"""Merging into a weight another module shares (tied embeddings) without changing that module."""
from __future__ import annotations

import warnings

from peft import PeftModel
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

_RETIE = "_fastft_retie_on_unmerge"  # on a PeftModel: what merge_adapter untied, tied again by unmerge_adapter


def untie_adapted_weights(model: PeftModel, *, until_unmerged: bool = False) -> None:
    """An adapted layer whose weight is tied to another module's (lm_head and the embeddings of a tied model) gets
    its own copy before the merge: merged in place, the shared weight would carry the lm_head's ΔW into the
    embeddings too (peft's merge changed such a model's logits by ~100%). The config then says untied, so the merged
    model saves and loads both matrices. until_unmerged (merge_adapter): `retie_unmerged` ties them again once no
    layer is merged (the shared weight itself, not the unmerged copy's W + ΔW − ΔW)."""
    owners = _owners(model)
    untied, shared = [], []
    for name, module in model.named_modules():
        base = module.get_base_layer() if callable(getattr(module, "get_base_layer", None)) else None
        weight = getattr(base, "weight", None) if base is not module else None
        if isinstance(weight, nn.Parameter) and owners.get(id(weight), 0) > 1:
            base.weight = nn.Parameter(weight.detach().clone(), requires_grad=weight.requires_grad)
            untied.append(name)
            shared.append((base, weight))
    if not untied:
        return
    shared += _untie_the_other_word_embeddings(model)
    config = model.get_base_model().config
    configs = list({id(c): c for c in (config, config.get_text_config())}.values())
    flags = [(cfg, getattr(cfg, "tie_word_embeddings", None)) for cfg in configs]
    for cfg in configs:
        cfg.tie_word_embeddings = False
    if until_unmerged:
        earlier = model.__dict__.get(_RETIE)
        model.__dict__[_RETIE] = (earlier[0] + shared, earlier[1]) if earlier else (shared, flags)
        warnings.warn(f"fastft merge_adapter: {', '.join(untied)} shared its weight with another module (tied "
                      "embeddings): merged into a copy of it until unmerge_adapter ties them again, so the shared "
                      "module keeps its weight", stacklevel=4)
        return
    warnings.warn(f"fastft merge: {', '.join(untied)} shared its weight with another module (tied "
                  "embeddings): merged into a copy of it, so the merged model keeps the adapted model's outputs "
                  "and holds both matrices (tie_word_embeddings=False)", stacklevel=4)


def _owners(model: nn.Module) -> dict[int, int]:
    """id(parameter) → how many names the model holds it under."""
    owners: dict[int, int] = {}
    for _, param in model.named_parameters(remove_duplicate=False):
        owners[id(param)] = owners.get(id(param), 0) + 1
    return owners


def _untie_the_other_word_embeddings(model: PeftModel) -> list[tuple[nn.Module, nn.Parameter]]:
    """The word embeddings still sharing one weight after the adapted layers got their own: one copy each but the
    first's. tie_word_embeddings=False unties all of a model's word embeddings (BART's encoder and decoder
    embed_tokens, shared and lm_head), and a checkpoint holds a shared tensor once: the others loaded as random
    (BART with LoRA on lm_head, saved merged and reloaded: logits 1.0 off). Returns (module, its shared weight)."""
    owners, first, copied = _owners(model), set(), []
    output = model.get_base_model().get_output_embeddings()
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if isinstance(module, BaseTunerLayer) or not isinstance(weight, nn.Parameter) \
                or not (isinstance(module, nn.Embedding) or module is output) or owners[id(weight)] < 2:
            continue
        if id(weight) not in first:
            first.add(id(weight))
            continue
        module.weight = nn.Parameter(weight.detach().clone(), requires_grad=weight.requires_grad)
        copied.append((module, weight))
    return copied


def retie_unmerged(model: PeftModel) -> None:
    """After unmerge_adapter: once no layer holds a merged adapter, the layers merge_adapter untied share their
    weight again and the config says tied as it did (a merge/unmerge pair — TRL's weight sync — leaves the model as
    it was, not with a second vocab × hidden matrix)."""
    record = model.__dict__.get(_RETIE)
    if record is None or any(isinstance(m, BaseTunerLayer) and m.merged for m in model.modules()):
        return
    shared, flags = record
    for base, weight in shared:
        base.weight = weight
    for cfg, flag in flags:
        cfg.tie_word_embeddings = flag
    del model.__dict__[_RETIE]
