"""The thin PEFT layer for LoRA: peft does the bookkeeping, fastft does the hot path.

peft's LoraModel already handles target matching, layers_to_transform, rank/alpha patterns,
modules_to_save, named adapters, merging and its save format, and the ecosystem reads that format.
fastft validates the config up front (clear errors), lets peft build the model, then swaps each
plain LoRA Linear to `FusedLoraLinear` (same state, fused forward). Layers the fused op does not cover run peft's
own forward, exactly: LoRA on embeddings and convolutions, and on transformers' Conv1D (GPT-2, whose weight is
stored (in, out): peft sets fan_in_fan_out=True for them). Creating, saving and loading follow that one rule.
"""
from __future__ import annotations

import contextlib
import copy
import inspect
import os
import re
import warnings
from contextvars import ContextVar
from pathlib import Path

import peft
import torch
from peft import LoraConfig, PeftModel
from peft.tuners.lora import Linear as PeftLoraLinear
from peft.tuners.tuners_utils import BaseTunerLayer, _maybe_include_all_linear_layers, check_target_module_exists
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from peft.utils.constants import DUMMY_TARGET_MODULES
from torch import nn
from transformers.pytorch_utils import Conv1D

from fastft.files import merge_into_folder
from fastft.integration.checkpointing import drop_input_grad_hooks_if_unneeded
from fastft.integration.module_names import name_hint, names_module
from fastft.integration.methods.prompt import whole_prompt_encoders
from fastft.integration.sharded_state import gathered_adapter_state, is_sharded, write_on_rank0
from fastft.modules.lora import FusedLoraLinear
from fastft.modules.nf4_linear import NF4Linear
from fastft.modules.qlora import FusedQLoraLinear, NF4RoundingWarning

# Fields that change the LoRA forward into something the fused op does not compute (layer_replication: see
# _CREATION_REASONS); each must stay off (None/False) when creating an adapter. Initialisation schemes and
# modules_to_save are fine: the forward stays plain LoRA. fan_in_fan_out is not here: it only describes Conv1D
# layers, which run peft's forward (check_fan_in_fan_out). A saved adapter with these fields loads (its layers run
# peft's forward), except on an NF4 base (check_loadable).
_UNSUPPORTED_FIELDS = (
    "use_dora", "lora_bias", "use_qalora", "alora_invocation_tokens", "arrow_config",
    "use_bdlora", "velora_config", "monteclora_config", "kasa_config", "megatron_config", "layer_replication",
    "target_parameters",
)
_SUPPORTED_INITS = (True, False, "gaussian", "olora", "orthogonal")

# Why a field of _UNSUPPORTED_FIELDS is refused when creating, where "it changes the LoRA forward" is not the reason.
_CREATION_REASONS = {
    "layer_replication": "peft copies the model's layers (sharing their weights) before adding the adapters, and "
                         "fastft's checks of targets, layer indices and patterns, and its QLoRA layers, cover the "
                         "model as given, not the copies",
}
_LOAD_INSTEAD = ("create the adapter with peft (peft.get_peft_model) and save it; fastft.load_adapter(model, path, "
                 "is_trainable=True) loads it onto the dense model, where it trains as with peft")

# Initialisations that need peft's own preparation (data, gradients, quantization): what to do instead. Those that
# rewrite the base weights need that base saved too, and the config saved with init_lora_weights=True (peft's own
# load would run the initialisation again, which needs the preparation).
_REWRITES_BASE = ("initialise with peft on the dense model (its preprocessing first), then set "
                  "peft_model.peft_config[name].init_lora_weights = True and save the adapter (save_pretrained); it "
                  "rewrote the base weights, so save that base too (peft_model.unload().save_pretrained(base_path)) "
                  "and go on with fastft.load_adapter(<the model loaded from base_path>, path, is_trainable=True)")
_INIT_INSTEAD = {
    "eva": "EVA initialises from activations on your data: initialise with peft (peft.get_peft_model, then "
           "peft.initialize_lora_eva_weights(peft_model, dataloader)), save it (save_pretrained), and go on with "
           "fastft.load_adapter(model, path, is_trainable=True)",
    "corda": f"CorDA initialises from activations on your data (peft's preprocess_corda); {_REWRITES_BASE}",
    "lora_ga": f"LoRA-GA initialises from gradients on your data (peft's preprocess_loraga); {_REWRITES_BASE}",
    "loftq": f"LoftQ initialises from a quantization of the base weights; {_REWRITES_BASE}",
}


class UnmatchedTargetWarning(UserWarning):
    """A LoraConfig.target_modules list entry matches no module of the model: peft adds no layer for it (a list may
    name the layers of several architectures, so it is not an error)."""


def _config_error(field: str, value, why: str) -> ValueError:
    return ValueError(f"LoraConfig.{field}={value!r} is not supported by fastft: {why}")


def validate_lora_config(config, model: nn.Module) -> None:
    """Raise a ValueError naming the field for anything fastft cannot run or that would silently do nothing."""
    if not isinstance(config, LoraConfig):
        raise TypeError(f"fastft expects a peft.LoraConfig, got {type(config).__name__}")
    for field in _UNSUPPORTED_FIELDS:
        value = getattr(config, field, None)
        if value not in (None, False):
            why = _CREATION_REASONS.get(field, "it changes the LoRA forward beyond x·Wᵀ + s·(x·Aᵀ)·Bᵀ")
            raise _config_error(field, value, f"{why}. Instead, {_LOAD_INSTEAD}")
    init = config.init_lora_weights
    if not (init in _SUPPORTED_INITS or (isinstance(init, str) and init.startswith("pissa"))):
        instead = _INIT_INSTEAD.get(init, "use peft directly for it")
        raise _config_error("init_lora_weights", init, f"fastft creates {_SUPPORTED_INITS} and 'pissa*'. "
                                                       f"Instead: {instead}")
    check_init_fits_base(config, model, "use True, 'gaussian' or 'orthogonal'")
    if not 0.0 <= config.lora_dropout < 1.0:
        raise _config_error("lora_dropout", config.lora_dropout, "expected a probability in [0, 1)")
    if not isinstance(config.r, int) or config.r <= 0:
        raise _config_error("r", config.r, "expected a positive integer rank")
    _check_targets(config, model)


def check_init_fits_base(config: LoraConfig, model: nn.Module, fix: str) -> None:
    """PiSSA and OLoRA initialise by decomposing the base weight (also when peft builds a saved adapter's layers),
    which an NF4 base cannot give: refused naming init_lora_weights, `fix` saying what to do instead."""
    init = config.init_lora_weights
    if (init == "olora" or str(init).startswith("pissa")) and any(isinstance(m, NF4Linear) for m in model.modules()):
        raise _config_error("init_lora_weights", init, f"it decomposes the base weight, which is NF4 here (QLoRA); "
                                                       f"{fix}")


def _modules_as_bases(model: nn.Module):
    """(name, module) of every module; a peft adapter layer counts as its base layer (its insides, the base and
    the lora_A/lora_B linears, are skipped), so a model that already holds adapters lists the same names."""
    inside = None
    for name, module in model.named_modules():
        if inside is not None and name.startswith(inside):
            continue  # named_modules is pre-order: a layer's insides follow it
        inside = None
        if isinstance(module, BaseTunerLayer):
            inside, module = name + ".", module.get_base_layer()
        yield name, module


def _linear_layers(model: nn.Module):
    """(name, layer) of every linear layer (`_modules_as_bases`)."""
    for name, module in _modules_as_bases(model):
        if isinstance(module, (nn.Linear, NF4Linear)):
            yield name, module


def _linear_names(model: nn.Module) -> list[str]:
    return [name for name, _ in _linear_layers(model)]


def with_quantized_targets(config: LoraConfig, model: nn.Module) -> LoraConfig:
    """QLoRA: have peft wrap fastft's NF4Linear layers in FusedQLoraLinear (peft knows only its own types)."""
    _expand_all_linear(config, model)
    if getattr(config, "use_dora", False):
        from fastft.integration.methods.dora import register_quantized

        return register_quantized(config, model)
    if any(isinstance(m, NF4Linear) for m in model.modules()):
        # config.fan_in_fan_out stays as peft would save it for the dense model (True for GPT-2): the QLoRA layers
        # ignore it, an NF4 weight being (out, in) always (FusedQLoraLinear.fan_in_fan_out)
        config._register_custom_module({NF4Linear: FusedQLoraLinear})
    return config


def _expand_all_linear(config: LoraConfig, model: nn.Module) -> None:
    """target_modules="all-linear" over a model with NF4Linear layers: peft expands it over its own linear types
    only (none would match), so the names are collected here as peft collects them: the last name component of
    every linear layer, the output layer left out."""
    if config.target_modules != "all-linear" or not any(isinstance(m, NF4Linear) for m in model.modules()):
        return
    get_output = getattr(model, "get_output_embeddings", None)
    output = get_output() if callable(get_output) else None
    output = output.get_base_layer() if isinstance(output, BaseTunerLayer) else output
    config.target_modules = {name.rsplit(".", 1)[-1] for name, m in _linear_layers(model) if m is not output}


def targeted_modules(config, model: nn.Module, mapping: dict) -> list[tuple[str, nn.Module]] | None:
    """(name, base layer) of every module `config` targets in `model`, resolved as peft resolves it (on a copy, the
    user's config untouched): target_modules=None from the model type's defaults in `mapping` (peft's table for the
    method), "all-linear" to every linear layer but the output one. None where peft cannot resolve it (it raises)."""
    resolved = copy.copy(config)
    if resolved.target_modules is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in mapping:
            return None
        resolved.target_modules = set(mapping[model_type])
    _expand_all_linear(resolved, model)  # NF4 layers, which peft's own expansion does not see
    resolved = _maybe_include_all_linear_layers(resolved, model)
    return [(name, module) for name, module in _modules_as_bases(model)
            if name and _is_target(check_target_module_exists(resolved, name))]


def _is_target(found) -> bool:
    return found is True or isinstance(found, re.Match)  # peft's excluded-module marker is truthy, not a target


def check_fan_in_fan_out(config, targeted, field: str = "LoraConfig.fan_in_fan_out", context: str = "") -> None:
    """fan_in_fan_out=True describes a weight stored (in, out): transformers' Conv1D (GPT-2). Those layers run
    peft's forward; on nn.Linear (and NF4) layers peft would silently reset it, so a config that sets it with no
    Conv1D among its targets is a mistake, refused naming the field."""
    if not getattr(config, "fan_in_fan_out", False) or targeted is None:
        return
    if not any(isinstance(module, Conv1D) or getattr(module, "from_conv1d", False) for _, module in targeted):
        kinds = sorted({type(module).__name__ for _, module in targeted})
        raise ValueError(f"{field}=True{context} is not supported for these layers: none of the layers it targets "
                         f"is a transformers Conv1D (GPT-2 style, weight stored (in, out)), the only kind it "
                         f"describes; they are {kinds}. Leave fan_in_fan_out=False (peft sets it on Conv1D layers)")


def _check_targets(config: LoraConfig, model: nn.Module) -> None:
    """Targets, patterns, exclusions and modules_to_save checked against what peft will build, so that an entry
    that matches nothing (a typo: it would silently do nothing) is named; peft's own matching rules throughout."""
    targets = config.target_modules
    if targets is not None and len(targets) == 0 and config.trainable_token_indices:
        raise ValueError(f"LoraConfig.target_modules=[] with trainable_token_indices: peft refuses empty "
                         f"targets; for trainable tokens alone pass target_modules={DUMMY_TARGET_MODULES!r}")
    _check_layer_selection(config, model)  # before the "matches no module" below, which a bad one also causes
    targeted = targeted_modules(config, model, TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING)
    if targeted == [] and targets not in (None, "all-linear", DUMMY_TARGET_MODULES):  # peft's "no LoRA layers"
        suffixes = sorted({n.rsplit(".", 1)[-1] for n in _linear_names(model)})
        shown = sorted(targets) if isinstance(targets, (set, list, tuple)) else targets
        raise ValueError(f"LoraConfig.target_modules={shown!r} matches no module of {type(model).__name__}"
                         f" (with layers_to_transform={config.layers_to_transform!r}); its linear layers are "
                         f"named {suffixes}")
    names = [name for name, _ in model.named_modules(remove_duplicate=False) if name]
    _warn_unmatched_targets(config, model, names)
    check_fan_in_fan_out(config, targeted)
    if targeted is not None:
        _check_patterns(config, [name for name, _ in targeted])
    check_exclude_modules(config, names, "LoraConfig")
    check_modules_to_save(config, names, "LoraConfig")
    _check_modules_to_save_dense(config, model)


def _warn_unmatched_targets(config: LoraConfig, model: nn.Module, names: list[str]) -> None:
    """One warning naming the target_modules list entries that match no module (peft's rule: the name or a dotted
    suffix of it), with a did-you-mean: peft adds nothing for them. Not an error: a list may name the layers of
    several architectures (Llama's and GPT-2's), on purpose."""
    targets = config.target_modules
    if targets is None or isinstance(targets, str):
        return  # peft's defaults for the model type; a regex
    unmatched = [t for t in (sorted(targets) if isinstance(targets, set) else targets)
                 if not any(names_module(t, n) for n in names)]
    if not unmatched:
        return
    hints = [f"{t!r}: {hint}" for t in unmatched if (hint := name_hint(t, names)).startswith("did you mean")]
    layers = sorted({n.rsplit(".", 1)[-1] for n, m in _modules_as_bases(model) if _features(m) is not None})
    warnings.warn(f"LoraConfig.target_modules entries {unmatched} match no module of {type(model).__name__}, so they "
                  f"get no LoRA layer (peft adapts the other entries){'; ' + '; '.join(hints) if hints else ''}. "
                  f"Its linear layers are named {layers}", UnmatchedTargetWarning, stacklevel=5)


def _layer_index(name: str, patterns) -> int | None:
    """The layer index peft reads from module `name` for layers_to_transform (peft's check_target_module_exists):
    the number after the first `<list>.`, `<list>` one of `patterns` (None: any name)."""
    if not patterns:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
    else:
        for pattern in patterns:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", name)
            if match is not None:
                break
    return None if match is None else int(match["idx"])


def _layer_lists(names: list[str]) -> list[str]:
    """The names of the numbered layer lists holding `names` (the list of 'model.layers.0.q_proj' is 'layers')."""
    return sorted({m[1] for n in names if (m := re.match(r".*?\.?([^.]+)\.\d+\.", n))})


def _index_ranges(indices: set[int]) -> str:
    ordered = sorted(indices)
    if ordered == list(range(ordered[0], ordered[-1] + 1)):
        return f"{ordered[0]}..{ordered[-1]}"
    return str(ordered)


def _check_layer_selection(config: LoraConfig, model: nn.Module) -> None:
    """layers_to_transform and layers_pattern against the layers that hold the modules target_modules matches, read
    as peft reads them: an index no layer has, or a pattern naming no layer list, selects nothing (peft drops it
    silently while other indices match)."""
    wanted = config.layers_to_transform
    if wanted is None or wanted == [] or isinstance(config.target_modules, str):
        return  # peft refuses layers_to_transform with a regex target_modules itself
    unfiltered = copy.copy(config)
    unfiltered.layers_to_transform, unfiltered.layers_pattern = None, None
    targeted = targeted_modules(unfiltered, model, TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING)
    candidates = [name for name, _ in targeted or ()]
    if not candidates:
        return  # target_modules matches nothing at all: named by _check_targets
    kind, lists = type(model).__name__, _layer_lists(candidates)
    patterns = config.layers_pattern
    patterns = [patterns] if isinstance(patterns, str) else list(patterns or ())
    found = {i for name in candidates if (i := _layer_index(name, patterns)) is not None}
    if not found and patterns:
        raise ValueError(f"LoraConfig.layers_pattern={config.layers_pattern!r} names no layer list of {kind} that "
                         f"holds the modules target_modules matches, so layers_to_transform selects nothing; their "
                         f"layer lists are {lists}: set layers_pattern to the one meant, or leave it None (peft then "
                         "reads the first numbered part of each module name)")
    if not found:
        raise ValueError(f"LoraConfig.layers_to_transform={wanted!r}: none of the modules target_modules matches "
                         f"in {kind} sits in a numbered layer list (e.g. {candidates[:3]}), so it selects nothing; "
                         "leave layers_to_transform None")
    missing = sorted({wanted} - found if isinstance(wanted, int) else set(wanted) - found)
    if missing:
        shown = missing[0] if len(missing) == 1 else missing
        raise ValueError(f"LoraConfig.layers_to_transform={wanted!r}: {kind} has no layer {shown} holding the "
                         f"modules target_modules matches (its layer list{'s' if len(lists) > 1 else ''} "
                         f"{' / '.join(map(repr, lists))}: {_index_ranges(found)}), so that index selects nothing: "
                         "give indices among them")


def _nf4_module_to_save(config, model: nn.Module) -> tuple[str, str] | None:
    """(entry, module name) of the first modules_to_save entry (or head peft adds for the task) naming a module that
    is or holds an NF4 layer: peft trains and saves such a module as a whole copy, which a frozen 4-bit weight cannot
    be, and finds that only after building LoRA layers inside the user's model."""
    added = _PEFT_HEAD_NAMES.get(getattr(config.task_type, "value", config.task_type), ())
    for entry in (*(getattr(config, "modules_to_save", None) or ()), *added):
        for name, module in model.named_modules():
            if name.endswith(entry) and any(isinstance(m, NF4Linear) for m in module.modules()):
                return entry, name
    return None


def _keep_dense(entry: str) -> str:
    return f"to train it, keep it dense when quantizing: fastft.quantize_model(model, skip=[{entry!r}])"


def _check_modules_to_save_dense(config: LoraConfig, model: nn.Module) -> None:
    found = _nf4_module_to_save(config, model)
    if found is not None:
        entry, name = found
        raise ValueError(f"LoraConfig.modules_to_save entry {entry!r} names '{name}', which is or holds an NF4 (QLoRA) "
                         f"layer: its 4-bit weight cannot be trained or saved whole. {_keep_dense(entry).capitalize()}"
                         "; or adapt it with LoRA instead (target_modules)")


def _check_patterns(config: LoraConfig, matched: list[str]) -> None:
    for field in ("rank_pattern", "alpha_pattern"):
        for key in getattr(config, field) or {}:
            if not any(re.match(rf"(.*\.)?({key})$", n) for n in matched):  # peft's get_pattern_key
                raise ValueError(f"LoraConfig.{field} key {key!r} matches none of the targeted modules "
                                 f"(e.g. {matched[:3]}); fix the key or drop it")


def check_exclude_modules(config, names: list[str], label: str) -> None:
    """Every exclude_modules entry must match some module as peft matches it (a string: a regex full match; a
    list: the name or a dotted suffix of it); one that matches nothing excludes nothing."""
    exclude = getattr(config, "exclude_modules", None)
    if not exclude:
        return
    if isinstance(exclude, str):
        unmatched = [] if any(re.fullmatch(exclude, n) for n in names) else [exclude]
    else:
        unmatched = [e for e in exclude if not any(names_module(e, n) for n in names)]
    if unmatched:
        raise ValueError(f"{label}.exclude_modules entry {unmatched[0]!r} matches no module of the model, so it "
                         f"excludes nothing; {name_hint(unmatched[0], names)}")


# peft appends these to modules_to_save itself for classification models, whichever of them the model has.
_PEFT_HEAD_NAMES = {"SEQ_CLS": ("classifier", "score"), "TOKEN_CLS": ("classifier", "score")}


def check_modules_to_save(config, names: list[str], label: str) -> None:
    """Every modules_to_save entry must match some module as peft matches it (the name ends with it); one that
    matches nothing leaves that module frozen and unsaved (a classification head not trained)."""
    task = getattr(config.task_type, "value", config.task_type)
    added = _PEFT_HEAD_NAMES.get(task, ())
    for entry in getattr(config, "modules_to_save", None) or ():
        if entry not in added and not any(n.endswith(entry) for n in names):
            raise ValueError(f"{label}.modules_to_save entry {entry!r} matches no module of the model, so nothing "
                             f"would be trained or saved for it; {name_hint(entry, names)}")


def patch_peft(model: nn.Module) -> nn.Module:
    """Turn every plain peft LoRA Linear inside `model` into a FusedLoraLinear, in place.

    The state dict, adapters and peft methods are unchanged; outputs are the same up to rounding.
    Returns the model. Raises ValueError if it holds no peft LoRA Linear at all.
    """
    from fastft.integration.methods.dora import fused_class_for

    found = 0
    for module in model.modules():
        if isinstance(module, PeftLoraLinear):
            found += 1
            if type(module) is PeftLoraLinear or (type(module) is FusedLoraLinear and module.lora_magnitude_vector):
                module.__class__ = fused_class_for(module)
    if not found:
        raise ValueError(f"patch_peft: {type(model).__name__} contains no peft LoRA Linear layer "
                         "(build it with peft.get_peft_model(model, LoraConfig(...)) first)")
    return model


def fuse_or_warn(model: nn.Module, layer_type: type, patch, what: str, method: str) -> nn.Module:
    """`patch` (patch_peft, patch_ia3) for a model fastft built or loaded: one whose `method` layers are all
    embeddings, convolutions or Conv1D is valid (peft runs them exactly), so nothing to fuse is a one-line warning,
    not an error. `layer_type`: peft's Linear layer of the method (fastft's fused layers subclass it). Every
    PeftModel fastft returns passes here: its own add_adapter/load_adapter are routed through fastft's."""
    route_adapter_methods(model)
    if any(isinstance(m, layer_type) for m in model.modules()):
        patch(model)
    if not any(isinstance(m, layer_type) and not m.fan_in_fan_out for m in model.modules()):
        warnings.warn(f"fastft.{what}: no {method} layer is fused (none is on a Linear layer: embeddings, "
                      "convolutions and GPT-2 Conv1D layers run peft's own forward)", stacklevel=3)
    return model


def fuse_lora_layers(model: nn.Module, what: str) -> nn.Module:
    return fuse_or_warn(model, PeftLoraLinear, patch_peft, what, "LoRA")


# --- peft's own model.add_adapter / model.load_adapter on the PeftModels fastft returns -------------------------------
# They go through fastft.add_adapter / fastft.load_adapter (validated; NF4 layers built as QLoRA, which peft alone
# cannot: it knows no NF4Linear; every layer fused). Inside a fastft call the PeftModel's methods are peft's own again
# (fastft and its method rooms call them), given the peft options the user passed to the routed method.
_ADAPTER_CALL: ContextVar = ContextVar("fastft_adapter_call", default=None)


class _AdapterCall:
    def __init__(self, options: dict):
        self.options = options  # peft's add/load options: low_cpu_mem_usage, autocast_adapter_dtype, torch_device...
        self.load_result = None  # what peft's load_adapter returned, for the routed load_adapter to return


@contextlib.contextmanager
def _adapter_call(**options):
    """A fastft add/load in progress (a nested one joins it)."""
    call = _ADAPTER_CALL.get()
    if call is not None:
        yield call
        return
    token = _ADAPTER_CALL.set(_AdapterCall(options))
    try:
        yield _ADAPTER_CALL.get()
    finally:
        _ADAPTER_CALL.reset(token)


def _options(method, *args, **kwargs) -> dict:
    """The options of a call to peft's `method` (all but its first two arguments) by name, positional ones too."""
    signature = inspect.signature(method)
    options = {}
    for name, value in list(signature.bind(*args, **kwargs).arguments.items())[2:]:
        options.update(value if signature.parameters[name].kind is inspect.Parameter.VAR_KEYWORD else {name: value})
    return options


def _accepted(method, options: dict) -> dict:
    params = inspect.signature(method).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return options
    return {k: v for k, v in options.items() if k in params}


class FastftAdapterMethods:
    """Mixed into the class of every PeftModel fastft returns (route_adapter_methods): peft's spelling
    `model.add_adapter(name, config)` / `model.load_adapter(path, name)` works as fastft.add_adapter /
    fastft.load_adapter do. Signatures and return values are peft's."""

    def add_adapter(self, adapter_name, peft_config, *args, **kwargs):
        call = _ADAPTER_CALL.get()
        if call is not None:  # fastft's own call inside: peft's, with the user's options
            options = {**_accepted(super().add_adapter, call.options), **kwargs}
            with _undone_on_failure(self, adapter_name):
                return super().add_adapter(adapter_name, peft_config, *args, **options)
        options = _options(super().add_adapter, adapter_name, peft_config, *args, **kwargs)
        if not isinstance(peft_config, (LoraConfig, peft.IA3Config)):  # kinds fastft does not add: peft's rules
            return super().add_adapter(adapter_name, peft_config, **options)
        with _adapter_call(**options):
            add_adapter(self, adapter_name, peft_config)
        return None

    def load_adapter(self, model_id, adapter_name, *args, **kwargs):
        call = _ADAPTER_CALL.get()
        if call is not None:
            call.load_result = super().load_adapter(model_id, adapter_name, *args, **{**call.options, **kwargs})
            return call.load_result
        options = _options(super().load_adapter, model_id, adapter_name, *args, **kwargs)
        is_trainable = options.pop("is_trainable", False)
        hub = {k: options.pop(k) for k in list(options) if k in _HUB_OPTIONS}
        with _adapter_call(**options) as call:
            load_adapter(self, _adapter_folder(model_id, hub), adapter_name, is_trainable=is_trainable)
        return call.load_result

    def __reduce_ex__(self, protocol):
        # pickled and deep-copied as the plain peft class, routed again when rebuilt: the routed class is made at run
        # time, so it has no name pickle could import
        state = super().__reduce_ex__(2)[2]
        return routed_peft_model, (_peft_class(type(self)),), state


_ROUTED: dict[type, type] = {}


def _peft_class(cls: type) -> type:
    return next(c for c in cls.__mro__ if issubclass(c, PeftModel) and not issubclass(c, FastftAdapterMethods))


def _routed_class(cls: type) -> type:
    """`cls` (a peft PeftModel class) with FastftAdapterMethods first; same name, so type(model).__name__ stays."""
    if cls not in _ROUTED:
        _ROUTED[cls] = type(cls.__name__, (FastftAdapterMethods, cls), {"__module__": __name__,
                                                                         "__qualname__": cls.__qualname__})
    return _ROUTED[cls]


def routed_peft_model(cls: type):
    """An empty instance of peft class `cls`, routed (unpickling and deepcopy fill in its state)."""
    routed = _routed_class(cls)
    return routed.__new__(routed)


def route_adapter_methods(model: nn.Module) -> nn.Module:
    """Route a PeftModel's own add_adapter/load_adapter through fastft's (in place; the class keeps its name)."""
    if isinstance(model, PeftModel) and not isinstance(model, FastftAdapterMethods):
        model.__class__ = _routed_class(type(model))
    return model


@contextlib.contextmanager
def _undone_on_failure(model: PeftModel, adapter_name: str):
    """peft's add_adapter, failing partway (a target type it does not support), drops the adapter's config but leaves
    the layers it built so far: their tensors would go into the next save of the other adapters. Removed here."""
    new = adapter_name not in model.peft_config
    try:
        yield
    except Exception:
        if new and adapter_name not in model.peft_config:
            for module in model.modules():
                if isinstance(module, BaseTunerLayer) and any(adapter_name in getattr(module, name, {})
                                                              for name in module.adapter_layer_names):
                    module.delete_adapter(adapter_name)
        raise


def _hub_options() -> frozenset:
    from huggingface_hub import hf_hub_download

    return frozenset(inspect.signature(hf_hub_download).parameters) | {"use_auth_token"}  # peft's split


_HUB_OPTIONS = _hub_options()


def _adapter_folder(model_id, hub: dict) -> Path:
    """The folder of a saved adapter: `model_id` (its `subfolder`) when it exists here, else the Hub repo's files
    downloaded as peft downloads them (adapter_config.json and the weights), with the same options."""
    local = Path(model_id, hub.get("subfolder") or "")
    if local.exists() or not _looks_like_repo_id(str(model_id)):
        return local  # fastft.load_adapter names what is missing
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    hub = dict(hub)
    if "use_auth_token" in hub:
        hub["token"] = hub.pop("use_auth_token")
    config = Path(hf_hub_download(str(model_id), "adapter_config.json", **hub))
    for name in WEIGHTS_NAMES:  # peft's order: safetensors, else .bin
        try:
            hf_hub_download(str(model_id), name, **hub)
            break
        except EntryNotFoundError:
            continue
    return config.parent


def _looks_like_repo_id(name: str) -> bool:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def get_peft_model(model: nn.Module, config, adapter_name: str = "default", **kwargs) -> PeftModel:
    """Like `peft.get_peft_model`, with fused LoRA layers. Only adapter (and modules_to_save) weights train.

    On a model quantized by `fastft.quantize_model` / `load_nf4_model` this is QLoRA: the NF4 layers get
    FusedQLoraLinear adapters (forward through fastft.ops.qlora_linear). LoRA on embeddings, convolutions and
    Conv1D layers (GPT-2; peft sets fan_in_fan_out=True for them) runs unfused, through peft's own forward.
    Other methods' configs (LoraConfig with use_dora, IA3Config, PrefixTuningConfig, PromptTuningConfig,
    PromptEncoderConfig, fastft's BottleneckAdapterConfig) go to their rooms in fastft.integration.methods.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"get_peft_model: model must be a torch nn.Module (a transformers model, e.g. from "
                        f"AutoModelForCausalLM.from_pretrained), got {type(model).__name__}")
    refuse_peft_model(model, "get_peft_model")
    if not isinstance(config, LoraConfig) or config.use_dora:
        from fastft.integration.methods import get_method_model

        return get_method_model(model, config, adapter_name=adapter_name, **kwargs)
    validate_lora_config(config, model)
    with_quantized_targets(config, model)
    return fuse_lora_layers(quiet_peft_model(model, config, adapter_name, **kwargs), "get_peft_model")


def refuse_peft_model(model: nn.Module, what: str) -> None:
    """A model with adapters would be wrapped in a second one (peft only warns): its save would mix two methods'
    tensors under one config, and a load would drop the inner ones."""
    if isinstance(model, PeftModel) or callable(getattr(model, "get_base_model", None)):  # fastft's adapter models
        more = (", or add a second adapter to this one with fastft.add_adapter or fastft.load_adapter"
                if isinstance(model, PeftModel) else "")
        raise TypeError(f"{what}: model is already a {type(model).__name__} holding adapters; give it the base "
                        f"model (a fresh one, or the base after unload()){more}")


def quiet_peft_model(model: nn.Module, config, adapter_name: str = "default", **kwargs) -> PeftModel:
    """`peft.get_peft_model`, without the FutureWarning peft raises reading transformers' deprecated
    `is_gradient_checkpointing` (nothing for the user to act on). Every method's room builds through it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        wrapped = peft.get_peft_model(model, config, adapter_name=adapter_name, **kwargs)
    # peft hooks the embedding for checkpointing of either mode (and transformers' enable may have hooked it before):
    # non-reentrant needs none, and compiles without
    drop_input_grad_hooks_if_unneeded(model)
    return wrapped


def add_adapter(model: PeftModel, adapter_name: str, config) -> PeftModel:
    """`model.add_adapter` with validation, keeping every LoRA (DoRA, QLoRA) or IA3 layer fused."""
    if not isinstance(model, PeftModel):
        raise TypeError(f"add_adapter expects a PeftModel (from fastft.get_peft_model), got {type(model).__name__}")
    if not isinstance(config, (LoraConfig, peft.IA3Config)):
        raise TypeError(f"add_adapter: config is a {type(config).__name__}; fastft adds LoraConfig (DoRA included) "
                        "and IA3Config adapters (use the PeftModel's own add_adapter for other kinds)")
    route_adapter_methods(model)  # model.add_adapter below: peft's, a failure partway undone
    with _adapter_call():
        if isinstance(config, peft.IA3Config):
            from fastft.integration.methods.ia3 import add_ia3_adapter

            return add_ia3_adapter(model, adapter_name, config)
        if getattr(config, "use_dora", False):
            from fastft.integration.methods.dora import validate_dora_config as validate
        else:
            validate = validate_lora_config
        validate(config, model.get_base_model())
        model.add_adapter(adapter_name, with_quantized_targets(config, model.get_base_model()))
    return fuse_lora_layers(model, "add_adapter")


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
            tensors = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            return {k: tuple(v.shape) for k, v in tensors.items()} if shapes_only else tensors
        with safe_open(str(file), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) if shapes_only else f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError, EOFError, pickle.UnpicklingError) as e:
        raise ValueError(f"load_adapter: {file} ({file.stat().st_size:,} bytes) is corrupt or truncated ({e}); "
                         "save the adapter again (fastft.save_adapter writes atomically) or restore the file "
                         "from a copy") from None


def _features(layer: nn.Module) -> tuple[int, int] | None:
    """(in_features, out_features) of a linear layer (transformers' Conv1D, GPT-2's, calls them nx and nf); None
    for other kinds (embeddings, convolutions), whose tensors peft checks itself."""
    if isinstance(layer, (nn.Linear, NF4Linear)):
        return layer.in_features, layer.out_features
    if isinstance(layer, Conv1D):
        return layer.nx, layer.nf
    return None


def check_adapter_tensors(base_model: nn.Module, path: Path, config, needs: dict) -> None:
    """Check a saved adapter's tensors against `base_model` (its base layers, when it holds adapters already):
    every tensor belongs to a module the model has, with the shape that module needs, and every linear layer the
    config targets has its tensors (peft would leave one without them at its fresh initialisation, only warning).
    `needs`: key tail (as in 'base_model.model.<module>.lora_A.weight') -> f(module name, in_features,
    out_features) giving the shape that tensor must have (None: any size, e.g. the rank)."""
    file = adapter_weights_file(path)
    shapes = read_weights(file, shapes_only=True)
    modules = dict(_modules_as_bases(base_model))
    tails = "|".join(re.escape(tail) for tail in needs)
    found = set()
    for key, shape in shapes.items():
        match = re.fullmatch(rf"base_model\.model\.(.+)\.({tails})", key)
        if match is None:
            continue  # modules_to_save and other extras are checked by peft itself
        module_name, tail = match.groups()
        if module_name not in modules:
            raise ValueError(f"load_adapter: {path} has '{key}' but {type(base_model).__name__} has no module "
                             f"'{module_name}'")
        found.add((module_name, tail))
        features = _features(modules[module_name])
        if features is None:
            continue
        want = needs[tail](module_name, *features)
        if len(shape) != len(want) or any(w is not None and n != w for n, w in zip(shape, want)):
            want = "(" + ", ".join("r" if w is None else str(w) for w in want) + ")"
            raise ValueError(f"load_adapter: '{key}' in {path} has shape {shape}, but module '{module_name}' "
                             f"needs {want}: the adapter was trained for a different model")
    if config.target_modules in (None, "all-linear") or getattr(config, "ensure_weight_tying", False):
        return  # peft resolves these targets itself; tied layers share their source's tensors
    missing = sorted({name for name, module in modules.items() if name and _features(module) is not None
                      and check_target_module_exists(config, name) and any((name, t) not in found for t in needs)})
    if missing:
        shown = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
        raise ValueError(f"load_adapter: {file} has no tensors for {len(missing)} of the modules its config "
                         f"targets in {type(base_model).__name__} ({shown}); they would keep their fresh "
                         "initialisation. The adapter was saved from a different model, or the file is incomplete: "
                         "save the adapter again")


_LORA_TENSORS = {"lora_A.weight": lambda name, in_f, out_f: (None, in_f),
                 "lora_B.weight": lambda name, in_f, out_f: (out_f, None)}


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
        check_adapter_tensors(base_model, path, config, _LORA_TENSORS)
    return config


def check_loadable(config: LoraConfig, base: nn.Module, path: Path, into_peft_model: bool) -> None:
    """The one load policy, onto a plain model or into a PeftModel. Creation-only checks (init schemes, options
    fastft will not create) do not apply: the saved weights replace the initialisation, and layers the fused op
    does not cover run peft's forward. Refused is only what would be silently wrong."""
    check_init_fits_base(config, base, f"load {path} onto the unquantized model, or save it converted to plain "
                                       "LoRA (peft's save_pretrained(path_initial_model_for_weight_conversion=...))")
    if into_peft_model and config.layer_replication:
        raise ValueError(f"load_adapter: {path} has LoraConfig.layer_replication={config.layer_replication!r}, "
                         "which makes peft copy the model's layers: the adapters this PeftModel holds would then run "
                         "on the copies too. Load it onto the plain base model instead")
    if (found := _nf4_module_to_save(config, base)) is not None:
        raise ValueError(f"load_adapter: {path} has LoraConfig.modules_to_save entry {found[0]!r}, a whole trained "
                         f"copy of '{found[1]}', which is an NF4 (QLoRA) layer here: load it onto the unquantized "
                         f"model, or {_keep_dense(found[0])}")
    if any(isinstance(m, NF4Linear) for m in base.modules()):
        conv1d = any(getattr(m, "from_conv1d", False) for m in base.modules())  # GPT-2: fan_in_fan_out fits
        for field in (*_UNSUPPORTED_FIELDS, *(() if conv1d else ("fan_in_fan_out",))):
            value = getattr(config, field, None)
            if field != "use_dora" and value not in (None, False):
                raise ValueError(f"load_adapter: {path} has LoraConfig.{field}={value!r}, which fastft's QLoRA "
                                 "layers (NF4 base) do not compute or merge; load it onto the unquantized model")


def load_adapter(model: nn.Module, path: str | os.PathLike, adapter_name: str = "default",
                 is_trainable: bool = False) -> PeftModel:
    """Load a peft-format LoRA adapter (saved by peft or fastft) into `model`, with fused layers.

    `model` is a plain transformers model (a PeftModel is built around it) or a PeftModel (the adapter is
    added under `adapter_name`). The adapter is checked against the model first. Other methods' adapters (IA3,
    prefix, prompt, P-tuning in peft's format; fastft bottleneck adapters) load through their rooms.
    """
    if isinstance(model, PeftModel):
        route_adapter_methods(model)  # model.add_adapter/load_adapter below (here and in the rooms): peft's
    with _adapter_call():
        return _load_adapter(model, path, adapter_name, is_trainable)


def _load_adapter(model: nn.Module, path, adapter_name: str, is_trainable: bool) -> PeftModel:
    from fastft.integration.methods import load_method_adapter

    if not isinstance(model, PeftModel):
        refuse_peft_model(model, "load_adapter")
    loaded = load_method_adapter(model, path, adapter_name=adapter_name, is_trainable=is_trainable)
    if loaded is not None:
        return loaded
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    config = check_adapter_fits(base, path)
    check_loadable(config, base, Path(path), isinstance(model, PeftModel))
    config = with_quantized_targets(config, base)
    config.inference_mode = not is_trainable
    if isinstance(model, PeftModel):
        if adapter_name in model.peft_config:
            raise ValueError(f"load_adapter: the model already has an adapter named {adapter_name!r}")
        model.add_adapter(adapter_name, config)  # built from this config (QLoRA layers registered above)
        if is_trainable:
            model.set_requires_grad(adapter_name)
        model.load_adapter(str(path), adapter_name=adapter_name, is_trainable=is_trainable)
        return fuse_lora_layers(model, "load_adapter")
    peft_model = PeftModel.from_pretrained(model, str(path), adapter_name=adapter_name, is_trainable=is_trainable,
                                           config=config)
    return fuse_lora_layers(peft_model, "load_adapter")


def merge_and_unload(model: PeftModel, *, requantize: bool = False, dtype=None, safe_merge: bool = False,
                     adapter_names: list[str] | None = None, progressbar: bool = False):
    """Merge the active adapters (or `adapter_names`, as peft's) into the base weights and return the plain model
    (peft's merge_and_unload; `safe_merge` and `progressbar` are peft's too).

    QLoRA layers are dequantized first and come back as dense nn.Linear (in `dtype`, default the dtype the model
    computes in: its embeddings', so the merged model runs after `model.to(dtype)`, peft's fp32 upcast or an fp16
    checkpoint loaded as bf16): W + ΔW exactly, no second rounding. With requantize=True they stay NF4Linear:
    W + ΔW is quantized again, which keeps the 4-bit footprint at the cost of one more NF4 rounding (README: "QLoRA").
    Adapters merged into the NF4 weights before (peft's merge_adapter()) already carry that rounding, which no
    unmerge undoes: the dense result keeps it, with a warning naming them.
    """
    from fastft.integration.nf4_model import compute_dtype

    if not isinstance(model, PeftModel):
        raise TypeError(f"merge_and_unload expects a PeftModel, got {type(model).__name__}")
    _check_adapter_names(model, adapter_names)
    with warnings.catch_warnings():
        # layers an earlier merge_adapter() merged: peft says "already merged" per layer; the warning below says more
        warnings.filterwarnings("ignore", message="(All adapters are already merged|Already following adapters were "
                                                  "merged)")
        if requantize:
            warnings.simplefilter("ignore", NF4RoundingWarning)  # asked for; the docstring says what it costs
        else:
            layers = [m for m in model.modules() if isinstance(m, FusedQLoraLinear)]
            _warn_merged_into_nf4(layers)
            dtype = dtype or (compute_dtype(model) if layers else None)
            for module in layers:
                module.to_dense(dtype)
        return model.merge_and_unload(progressbar=progressbar, safe_merge=safe_merge, adapter_names=adapter_names)


def _check_adapter_names(model: PeftModel, adapter_names) -> None:
    """peft merges nothing for a name no layer holds (and unloads every adapter all the same): refused here."""
    if adapter_names is None:
        return
    if isinstance(adapter_names, str) or not all(isinstance(n, str) for n in adapter_names):
        raise TypeError(f"merge_and_unload: adapter_names={adapter_names!r}; expected a list of adapter names, e.g. "
                        f"{[adapter_names] if isinstance(adapter_names, str) else list(model.peft_config)[:1]}")
    unknown = [n for n in adapter_names if n not in model.peft_config]
    if unknown:
        raise ValueError(f"merge_and_unload: adapter_names entry {unknown[0]!r} is not an adapter of this model; "
                         f"its adapters are {list(model.peft_config)}")


def _warn_merged_into_nf4(layers: list[FusedQLoraLinear]) -> None:
    merged = sorted({name for layer in layers for name in layer.merged_adapters})
    if merged:
        count = sum(bool(layer.merged_adapters) for layer in layers)
        warnings.warn(f"fastft.merge_and_unload: {count} QLoRA layers hold adapter(s) {merged} merged into their NF4 "
                      "weight already (merge_adapter()), a merge that re-quantized W + ΔW: the dense result carries "
                      "that one NF4 rounding, it is not the exact W + ΔW. For the exact merge, call it on a model "
                      "that was never merged (load the NF4 base and the adapter again; unmerge_adapter() would "
                      "re-quantize once more)", NF4RoundingWarning, stacklevel=3)


def save_adapter(model: PeftModel, path: str | os.PathLike, **kwargs) -> Path:
    """`model.save_pretrained(path)` made atomic: written to a temporary sibling, which then takes the folder's place
    as a whole, so an interrupted save leaves the previous save or the new one, never files of both (a config of one
    and the weights of the other would load without an error). Like peft's save, the folder's other files stay
    (other named adapters saved there before, a run's metrics). Folders and files get the modes the umask gives
    (as peft and transformers create them), not mkdtemp's private 0700 (fastft.files.merge_into_folder).
    `is_main_process=False` (peft's multi-process spelling) writes nothing, as peft's save writes nothing there."""
    if not (isinstance(model, PeftModel) or callable(getattr(model, "get_base_model", None))):  # + fastft's own
        raise TypeError(f"save_adapter: model is a {type(model).__name__}, which holds no adapter (it would write the "
                        "whole model); give the model fastft.get_peft_model or fastft.load_adapter returned, or save "
                        "a full model (e.g. after merge_and_unload) with model.save_pretrained(path)")
    if kwargs.get("state_dict") is None and is_sharded(model):  # FSDP2: every rank gathers, rank 0 writes
        kwargs.pop("is_main_process", None)
        kwargs["state_dict"] = gathered_adapter_state(model)
        write_on_rank0(lambda: _save_whole(model, path, kwargs), "save_adapter")  # its error raised on every rank
        return Path(path)
    if not kwargs.get("is_main_process", True):  # peft's multi-process spelling: only the main process writes
        return Path(path)
    return _save_whole(model, path, kwargs)


def _save_whole(model, path, kwargs) -> Path:
    with whole_prompt_encoders(model, kwargs.get("state_dict")):  # FSDP2-sharded prompt learning: the whole weights
        return merge_into_folder(path, lambda tmp: model.save_pretrained(str(tmp), **kwargs))
