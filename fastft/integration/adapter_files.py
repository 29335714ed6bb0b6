"""Reading and checking a saved peft adapter folder (adapter_config.json and the weights file): unreadable or
corrupt files, and tensors that do not fit the model, are refused naming the file before peft loads anything."""
from __future__ import annotations

import os
import re
from pathlib import Path

import peft
import torch
from peft import LoraConfig
from peft.tuners.tuners_utils import check_target_module_exists
from torch import nn

from fastft.integration.base_layers import (
    in_out_features,
    moe_conversion,
    moe_converted,
    modules_as_bases,
    targeted_parameters,
)


def read_peft_config(path: Path) -> peft.PeftConfig:
    """The peft config saved in adapter directory `path`, or a ValueError naming the file and what to do."""
    config_file = Path(path) / "adapter_config.json"
    try:
        return peft.PeftConfig.from_pretrained(str(path))
    except (ValueError, TypeError, OSError) as e:  # json.JSONDecodeError is a ValueError
        raise ValueError(f"load_adapter: {config_file} is not a readable peft adapter config ({e}); "
                         "save the adapter again or restore the file from a copy") from None


WEIGHTS_NAMES = ("adapter_model.safetensors", "adapter_model.bin")  # peft reads the first one there is


def adapter_weights_file(path: Path) -> Path:
    """The weights file of adapter directory `path` (peft's safetensors, else its safe_serialization=False .bin)."""
    for name in WEIGHTS_NAMES:
        if (path / name).is_file():
            return path / name
    raise FileNotFoundError(f"load_adapter: {path / WEIGHTS_NAMES[0]} not found, nor {WEIGHTS_NAMES[1]} (expected "
                            "a peft adapter directory)")


def read_weights(file: Path, *, shapes_only: bool = False) -> dict:
    """The tensors in a .safetensors or .bin weights file (or only their shapes, without reading the data); a
    ValueError naming the file if it is corrupt or truncated."""
    import pickle

    from safetensors import SafetensorError, safe_open

    try:
        if file.suffix == ".bin":
            import zipfile

            # mmap reads torch's zip format only; a legacy (pre-1.6) file peft still loads is read whole
            tensors = torch.load(file, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(file))
            return {k: tuple(v.shape) for k, v in tensors.items()} if shapes_only else tensors
        with safe_open(str(file), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) if shapes_only else f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError, EOFError, pickle.UnpicklingError) as e:
        raise ValueError(f"load_adapter: {file} ({file.stat().st_size:,} bytes) is corrupt or truncated ({e}); "
                         "save the adapter again (fastft.save_adapter writes atomically) or restore the file "
                         "from a copy") from None


def check_adapter_tensors(base_model: nn.Module, path: Path, config, needs: dict,
                          embedding_needs: dict | None = None) -> None:
    """Check a saved adapter's tensors against `base_model` (its base layers, when it holds adapters already):
    every tensor belongs to a module the model has (a parameter-targeted one, target_parameters: as peft nests its
    wrappers), with the shape that module needs, and every linear layer and parameter the config targets has its
    tensors (peft would leave one without them at its fresh initialisation, only warning).
    `needs`: key tail (as in 'base_model.model.<module>.lora_A.weight') -> f(module name, in_features,
    out_features) giving the shape that tensor must have (None: any size, e.g. the rank). `embedding_needs`: the same
    for an nn.Embedding the config targets (in_features = num_embeddings, out_features = embedding_dim); None:
    embeddings are left to peft."""
    file = adapter_weights_file(path)
    shapes = read_weights(file, shapes_only=True)
    modules = dict(modules_as_bases(base_model))
    tails = "|".join(re.escape(tail) for tail in {**needs, **(embedding_needs or {})})

    def needs_of(module: nn.Module):
        """(the tails `module` must have, its (in, out) features), or None for a kind not checked here."""
        features = in_out_features(module)
        if features is not None:
            return needs, features
        if embedding_needs is not None and isinstance(module, nn.Embedding):
            return embedding_needs, (module.num_embeddings, module.embedding_dim)
        return None

    def saved_tensors(shapes: dict):
        """(key, shape, saved module name, tail, base module name or None) of each adapter tensor of `shapes`."""
        for key, shape in shapes.items():
            match = re.fullmatch(rf"base_model\.model\.(.+)\.({tails})", key)
            if match is not None:  # else modules_to_save and other extras, checked by peft itself
                yield key, shape, *match.groups(), _module_of(match[1], modules, config)

    converted_from = None
    if any(name is None for *_, name in saved_tensors(shapes)) and _peft_converts_file(base_model, config):
        converted_from, shapes = shapes, _converted_shapes(base_model, config, shapes, path)
    found = set()
    for key, shape, saved_name, tail, module_name in saved_tensors(shapes):
        if module_name is None:
            raise ValueError(f"load_adapter: {path} has '{key}' but {type(base_model).__name__} has no module "
                             f"'{saved_name}'{_nesting_hint(saved_name, modules, config)}"
                             f"{_conversion_note(converted_from, base_model)}")
        found.add((saved_name, tail))
        kind = needs_of(modules[module_name])
        if kind is None or tail not in kind[0]:
            continue
        want = kind[0][tail](module_name, *kind[1])
        if len(shape) != len(want) or any(w is not None and n != w for n, w in zip(shape, want)):
            want = "(" + ", ".join("r" if w is None else str(w) for w in want) + ")"
            raise ValueError(f"load_adapter: '{key}' in {path} has shape {shape}, but module '{module_name}' "
                             f"needs {want}: the adapter was trained for a different model")
    wrappers = [saved for name, module in modules.items() if name
                for saved in _wrapper_names(name, targeted_parameters(config, name, module))]
    # a parameter's wrapper holds lora_A/lora_B only (no DoRA there)
    missing = [name for name in wrappers if any((name, t) not in found for t in needs if t in _LORA_TENSORS)]
    if not (config.target_modules in (None, "all-linear") or getattr(config, "ensure_weight_tying", False)):
        # else peft resolves the module targets itself; tied layers share their source's tensors
        missing += [name for name, module in modules.items() if name and needs_of(module) is not None
                    and check_target_module_exists(config, name)
                    and any((name, t) not in found for t in needs_of(module)[0])]
    missing = sorted(set(missing))
    if missing:
        shown = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
        raise ValueError(f"load_adapter: {file} has no tensors for {len(missing)} of the modules its config "
                         f"targets in {type(base_model).__name__} ({shown}); they would keep their fresh "
                         "initialisation. The adapter was saved from a different model, or the file is incomplete: "
                         "save the adapter again")


def _peft_converts_file(model: nn.Module, config) -> bool:
    """Whether peft converts an adapter file's keys on loading onto `model` (set_peft_model_state_dict: a LoRA
    adapter, transformers 5, and a model type transformers converts checkpoints for, e.g. Mixtral, whose experts it
    fused)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return (moe_conversion is not None and config.peft_type == peft.PeftType.LORA and model_type is not None
            and moe_conversion.get_checkpoint_conversion_mapping(model_type) is not None)


def _converted_shapes(model: nn.Module, config, shapes: dict, path: Path) -> dict:
    """The tensor shapes of an adapter file as peft converts it on loading (transformers 4's per-expert Mixtral keys
    'experts.<i>.w1/w3/w2' to the fused experts' nested ParamWrappers), run on meta tensors: no data is read."""
    meta = {k: torch.empty(shape, device="meta") for k, shape in shapes.items()}
    try:
        converted = moe_conversion.convert_peft_adapter_state_dict_for_transformers(model, config, meta)
    except (ValueError, RuntimeError, KeyError, IndexError) as e:
        raise ValueError(f"load_adapter: {path} holds keys of a transformers 4 {type(model).__name__} (e.g. "
                         f"{_example_key(shapes)!r}), which peft converts to transformers 5's layout on loading; "
                         f"that conversion failed ({e}): the file is incomplete or was saved from a different model. "
                         "Save it again, or load it with transformers 4") from None
    return {k: tuple(v.shape) for k, v in converted.items()}


def _example_key(shapes: dict) -> str:
    return next((k for k in sorted(shapes) if ".experts." in k), next(iter(sorted(shapes)), ""))


def _conversion_note(converted_from: dict | None, model: nn.Module) -> str:
    """For a key that fits no module even as peft converts the file for transformers 5: which layout was found."""
    if converted_from is None:
        return ""
    return (f" (the key as peft renames it converting the file's transformers 4 keys, e.g. "
            f"{_example_key(converted_from)!r}, for transformers 5's {type(model).__name__}): the adapter was "
            "saved from a different model, or the file holds a stray tensor")


_NESTED = ".base_layer"


def _wrapper_names(name: str, params: list[str]) -> list[str]:
    """The module names peft saves the tensors of `params` under: each targeted parameter of one module gets its own
    ParamWrapper, nested, the first one innermost; the outermost keeps the module's name, the ones inside it are
    '<name>.base_layer', '<name>.base_layer.base_layer', ... (Mixtral's experts.gate_up_proj + experts.down_proj)."""
    return [name + _NESTED * depth for depth in range(len(params))]


def _unnested(saved_name: str) -> str:
    while saved_name.endswith(_NESTED):
        saved_name = saved_name[: -len(_NESTED)]
    return saved_name


def _module_of(saved_name: str, modules: dict, config) -> str | None:
    """The base module a saved tensor belongs to: its own name, or for a nested ParamWrapper
    ('<module>.base_layer...') the module whose parameter it wraps; None if the model has no such module."""
    if saved_name in modules:
        return saved_name
    owner = _unnested(saved_name)
    if owner in modules and saved_name in _wrapper_names(owner, targeted_parameters(config, owner, modules[owner])):
        return owner
    return None


def _nesting_hint(saved_name: str, modules: dict, config) -> str:
    """Why a '<module>.base_layer' name fits no module: its config targets fewer of that module's parameters."""
    owner = _unnested(saved_name)
    if owner == saved_name or owner not in modules:
        return ""
    params = targeted_parameters(config, owner, modules[owner])
    return (f" (its config's target_parameters={sorted(getattr(config, 'target_parameters', None) or ())!r} wrap "
            f"{len(params)} parameter(s) of '{owner}', {params}, so peft nests {len(params)} layer(s) there)")


_LORA_TENSORS = {"lora_A.weight": lambda name, in_f, out_f: (None, in_f),
                 "lora_B.weight": lambda name, in_f, out_f: (out_f, None)}
_LORA_EMBEDDING_TENSORS = {"lora_embedding_A": lambda name, vocab, dim: (None, vocab),
                           "lora_embedding_B": lambda name, vocab, dim: (dim, None)}
_DORA_MAGNITUDE = {"lora_magnitude_vector": lambda name, in_f, out_f: (out_f,)}  # a row norm an output feature


def check_adapter_fits(base_model: nn.Module, path: str | os.PathLike) -> LoraConfig:
    """Check every LoRA tensor in a saved adapter against the module it belongs to, and that every module the
    config targets has its tensors; return its config."""
    path = Path(path)
    config_file = path / "adapter_config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"load_adapter: {config_file} not found (expected a peft adapter directory)")
    config = read_peft_config(path)
    if not isinstance(config, LoraConfig):
        raise ValueError(f"load_adapter: {config_file} describes a {type(config).__name__}, not a LoraConfig")
    if not config.layer_replication:  # with it peft copies layers first: 'layers.2' exists only then
        dora = _DORA_MAGNITUDE if config.use_dora else {}  # without it a layer would restart at m = ‖W‖
        check_adapter_tensors(base_model, path, _as_peft_loads(config, base_model, config_file),
                              {**_LORA_TENSORS, **dora}, {**_LORA_EMBEDDING_TENSORS, **dora})
    return config


def _as_peft_loads(config: LoraConfig, model: nn.Module, config_file: Path) -> LoraConfig:
    """The config as peft converts it before building the adapter (transformers 5: a transformers 4 Mixtral adapter's
    targets 'w1'/'w3'/'w2' become the fused experts' target_parameters); peft's refusal as a load_adapter error."""
    try:
        return moe_converted(config, model)
    except ValueError as e:  # e.g. 'w1' targeted without 'w3', which transformers 5 fused into one parameter
        raise ValueError(f"load_adapter: {config_file}: {e} (peft converts a transformers 4 adapter's targets for "
                         f"transformers 5's {type(model).__name__} and cannot convert these); load it with "
                         "transformers 4") from None

