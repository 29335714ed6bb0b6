"""How a transformers checkpoint names a model's tensors, and how its keys become the model's own.

Two rules, as transformers' own loader applies them: base_model_prefix (a base model's checkpoint loads into a model
with a head, and a full model's into its base model), and on transformers 5 the model's checkpoint conversions
(`transformers.conversion_mapping`): save_pretrained writes, and hub checkpoints hold, keys in the original layout,
which the loader renames (GPT-NeoX's `embed_out` is the model's `lm_head`, Gemma 3's `language_model.model.*` its
`model.language_model.*`) or merges (an MoE model's per-expert weights load as one fused tensor per layer).
"""
from __future__ import annotations

import copy

import torch
from torch import nn


def prefix_renamer(model: nn.Module, keys: set[str]):
    """transformers' base_model_prefix rule: a base model's checkpoint ("layers.0...") loads into a model with a head
    (whose names start "model."), and a full model's into its base model; other keys keep their names."""
    prefix = getattr(model, "base_model_prefix", "")
    if not prefix:
        return lambda key: key
    stored = any(k.startswith(prefix + ".") for k in keys)
    expected = isinstance(getattr(model, prefix, None), nn.Module)
    if expected and not stored:
        return lambda key: f"{prefix}.{key}"
    if stored and not expected:
        return lambda key: key[len(prefix) + 1:] if key.startswith(prefix + ".") else key
    return lambda key: key


class CheckpointKeys:
    """The model's names for a checkpoint's stored keys, and the merges its conversions make.

    name(stored): the model's name for a stored tensor; merged_into(name): the tensor it is merged into, or None for
    a tensor that loads as it is. Merged tensors are collected with add() and produced by merged() once all are read.
    """

    def __init__(self, model: nn.Module, stored_keys):
        self._renamings, self._converters = _conversions(model)
        self._by_pattern = {p: c for c in self._converters for p in c.source_patterns}
        self._prefixed = prefix_renamer(model, {self._renamed(k) for k in stored_keys})
        self._pending: dict[str, object] = {}  # merged tensor's name -> its converter, holding what it merges

    def name(self, stored: str) -> str:
        return self._prefixed(self._renamed(stored))

    def merged_into(self, name: str) -> str | None:
        return self._converter_match(name)[0]

    def add(self, name: str, stored: str, tensor: torch.Tensor) -> None:
        target, pattern = self._converter_match(name)
        converter = self._pending.setdefault(target, copy.deepcopy(self._by_pattern[pattern]))
        converter.add_tensor(target, stored, pattern, tensor)

    def merged(self, model: nn.Module):
        """(name, tensor) for every merged tensor, converted as transformers converts it; each converter is dropped
        once converted (it held the tensors it merged)."""
        while self._pending:
            target, converter = self._pending.popitem()
            yield from converter.convert(target, model=model, config=getattr(model, "config", None)).items()

    def _renamed(self, key: str) -> str:
        if not self._renamings:
            return key
        from transformers.core_model_loading import apply_renamings
        return apply_renamings(key, self._renamings)

    def _converter_match(self, name: str) -> tuple[str | None, str | None]:
        if not self._converters:
            return None, None
        from transformers.core_model_loading import apply_converters
        target, pattern = apply_converters(name, self._converters)
        return (target, pattern) if pattern is not None else (None, None)


def _conversions(model: nn.Module) -> tuple[list, list]:
    """transformers 5's checkpoint conversions for `model`: (renamings, converters); none on transformers 4."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming
    except ImportError:
        return [], []
    mapping = get_model_conversion_mapping(model)
    return ([m for m in mapping if isinstance(m, WeightRenaming)],
            [m for m in mapping if isinstance(m, WeightConverter)])
