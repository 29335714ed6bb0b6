"""How a transformers checkpoint names a model's tensors, and how its keys become the model's own.

Two rules, as transformers' own loader applies them: base_model_prefix (a base model's checkpoint loads into a model
with a head, and a full model's into its base model), and on transformers 5 the model's checkpoint conversions
(`transformers.conversion_mapping`): save_pretrained writes, and hub checkpoints hold, keys in the original layout,
which the loader renames (GPT-NeoX's `embed_out` is the model's `lm_head`, Gemma 3's `language_model.model.*` its
`model.language_model.*`) or converts (an MoE model's per-expert weights load as one fused tensor per layer,
Lara-mini's and HRM-Text's fused projections as the separate layers the model has). A stored key that is the model's
own and that the renamings would take elsewhere keeps its name, as in transformers.
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


def stored_namer(model: nn.Module):
    """key → the name to save `model`'s tensor `key` under so that transformers' loader (and load_nf4_model) names it
    `key` again: `key` itself, unless the model's load-time renamings change it; then the original-layout name
    transformers' save_pretrained writes (its renamings reversed), where that renames back to `key`.

    A renaming can change one of the model's own names (Laguna's unescaped `mlp.shared_expert.` matches
    `mlp.shared_experts` and makes `mlp.shared_experts..gate_proj`; Inkling2's `sconv.weight_proj` →
    `sconv.weight_proj.weight` matches its own output). transformers keeps a model key's own name, but a
    bitsandbytes part of it (`weight.absmax`, `weight.quant_state...`) is no model key: renamed, it loaded nowhere and
    the layer was left packed without its quant_state."""
    renamings, _ = _conversions(model)
    if not renamings:
        return lambda key: key
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import PrefixChange, WeightRenaming

    reverse = []

    def stored(key: str) -> str:
        if apply_renamings(key, renamings) == key:
            return key
        if not reverse:  # as transformers' revert_weight_conversion: latest first, no legacy (gamma → weight) or prefix
            reverse.extend(t.reverse_transform() for t in get_model_conversion_mapping(model, add_legacy=False)[::-1]
                           if isinstance(t, WeightRenaming) and not isinstance(t, PrefixChange))
        original = apply_renamings(key, reverse)
        return original if apply_renamings(original, renamings) == key else key
    return stored


def apply_renamings(key: str, renamings) -> str:
    """`key` after every renaming in turn, as transformers' loader renames it (transformers' own `apply_renamings`
    is not in 5.17, the GPU machine's release; each transform's rename_source_key is in both)."""
    for renaming in renamings:
        key, _ = renaming.rename_source_key(key)
    return key


class CheckpointKeys:
    """The model's names for a checkpoint's stored keys, and the conversions that make tensors of them.

    name(stored): the model's name for a stored tensor; converted_into(name): the tensor its converter makes (merges
    per-expert weights into, or the first of those it splits into), or None for a tensor that loads as it is;
    loads_as(name): every model tensor it ends up in. Converted tensors are collected with add() and produced by
    converted() once all are read.
    """

    def __init__(self, model: nn.Module, stored_keys):
        self._renamings, self._converters = _conversions(model)
        self._by_pattern = {p: c for c in self._converters for p in c.source_patterns}
        # the dense model's parameters, taken before its linear layers become NF4: converters read a target's shape
        # from the model (Split sizes Lara-mini's fused in_proj by its targets), and an NF4Linear's weight is none
        self._dense = dict(model.named_parameters())
        own = set(model.state_dict())
        prefixed = prefix_renamer(model, {self._renamed(k) for k in stored_keys})
        self._names: dict[str, str] = {}
        self._conversion: dict[str, tuple[str, str]] = {}  # name -> (the tensor its converter makes, the pattern)
        self._pending: dict[str, object] = {}  # converted tensor's name -> its converter, holding what it reads
        for stored in stored_keys:
            name = prefixed(self._renamed(stored))
            target, pattern = self._converter_match(name)
            # transformers' rule: a stored key that is the model's own, and that its renamings take to none of the
            # model's keys, keeps its name (DeepSeek-V4's `model.norm` matched the renaming of its attention's
            # `.norm.` into `.kv_norm.`)
            if (target or name) not in own and prefixed(stored) in own:
                name, target = prefixed(stored), None
            self._names[stored] = name
            if target is not None:
                self._conversion[name] = (target, pattern)

    def name(self, stored: str) -> str:
        return self._names[stored]

    def __contains__(self, stored: str) -> bool:
        return stored in self._names

    def converted_into(self, name: str) -> str | None:
        return self._conversion.get(name, (None,))[0]

    def loads_as(self, name: str) -> list[str]:
        """The model tensors `name` ends up in: itself, or every tensor its converter makes (a split's targets are
        named as transformers names them: the first target's pattern replaced by each)."""
        if name not in self._conversion:
            return [name]
        target, pattern = self._conversion[name]
        patterns = self._by_pattern[pattern].target_patterns
        return [target.replace(patterns[0], p) for p in patterns]

    def add(self, name: str, stored: str, tensor: torch.Tensor) -> None:
        target, pattern = self._conversion[name]
        converter = self._pending.setdefault(target, copy.deepcopy(self._by_pattern[pattern]))
        converter.add_tensor(target, stored, pattern, tensor)

    def converted(self, model: nn.Module):
        """(name, tensor) for every converted tensor, as transformers converts it; each converter is dropped once
        converted (it held the tensors it merged)."""
        view = _DenseParameters(model, self._dense)
        while self._pending:
            target, converter = self._pending.popitem()
            yield from converter.convert(target, model=view, config=getattr(model, "config", None)).items()

    def _renamed(self, key: str) -> str:
        return apply_renamings(key, self._renamings)

    def _converter_match(self, name: str) -> tuple[str | None, str | None]:
        for converter in self._converters:  # at most one converter per key, as transformers applies them
            target, pattern = converter.rename_source_key(name)
            if pattern is not None:
                return target, pattern
        return None, None


class _DenseParameters:
    """`model` as transformers' conversion ops read it (get_parameter: a target's shape and dtype), its parameters
    the dense ones it had before its linear layers became NF4."""

    def __init__(self, model: nn.Module, dense: dict):
        self._model, self._dense = model, dense

    def get_parameter(self, name: str):
        return self._dense[name] if name in self._dense else self._model.get_parameter(name)

    def __getattr__(self, name):
        return getattr(self._model, name)


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
