"""Which peft LoraConfigs fastft accepts: to create an adapter (validate_lora_config: clear errors naming the field,
before peft builds anything) and to load a saved one (check_loadable). Targets, layer selection, patterns,
exclusions and modules_to_save are matched as peft matches them, so an entry that would silently do nothing is
named; with_quantized_targets has peft build fastft's QLoRA layers on an NF4 base.
"""
from __future__ import annotations

import copy
import re
import warnings
from pathlib import Path

from peft import LoraConfig
from peft.tuners.tuners_utils import BaseTunerLayer, _maybe_include_all_linear_layers, check_target_module_exists
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from peft.utils.constants import DUMMY_TARGET_MODULES
from torch import nn
from transformers.pytorch_utils import Conv1D

from fastft.integration.base_layers import (
    config_copy,
    convert_moe_targets,
    in_out_features,
    moe_converted,
    modules_as_bases,
    targeted_parameters,
)
from fastft.integration.module_names import name_hint, names_module
from fastft.modules.nf4_linear import NF4Linear
from fastft.modules.qlora import FusedQLoraLinear

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
    _check_olora_targets(config, model)
    if not 0.0 <= config.lora_dropout < 1.0:
        raise _config_error("lora_dropout", config.lora_dropout, "expected a probability in [0, 1)")
    for field, r in [("r", config.r)] + [(f"rank_pattern[{k!r}]", v) for k, v in (config.rank_pattern or {}).items()]:
        if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
            raise _config_error(field, r, "expected a positive integer rank")
    for field, alpha in [("lora_alpha", config.lora_alpha)] + [
            (f"alpha_pattern[{k!r}]", v) for k, v in (config.alpha_pattern or {}).items()]:
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha < float("inf"):
            raise _config_error(field, alpha, "expected a positive finite number (the adapter's scale is "
                                              "lora_alpha / r; 0 would train nothing)")
    _check_targets(config, model)


def check_init_fits_base(config: LoraConfig, model: nn.Module, fix: str) -> None:
    """PiSSA and OLoRA initialise by decomposing the base weight (also when peft builds a saved adapter's layers),
    which an NF4 base cannot give: refused naming init_lora_weights, `fix` saying what to do instead."""
    init = config.init_lora_weights
    if (init == "olora" or str(init).startswith("pissa")) and any(isinstance(m, NF4Linear) for m in model.modules()):
        raise _config_error("init_lora_weights", init, f"it decomposes the base weight, which is NF4 here (QLoRA); "
                                                       f"{fix}")


def _check_olora_targets(config: LoraConfig, model: nn.Module) -> None:
    """OLoRA on a transformers Conv1D (GPT-2, weight stored (in, out)): peft decomposes the stored matrix as if it
    were (out, in) and builds A and B transposed; the model is made, and its first forward fails on a shape."""
    if config.init_lora_weights != "olora":
        return
    conv = [name for name, module in targeted_modules(config, model, TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING)
            or () if isinstance(module, Conv1D)]
    if conv:
        raise _config_error("init_lora_weights", "olora", f"peft's OLoRA takes a transformers Conv1D's weight (stored "
                                                          f"(in, out)) the wrong way round and builds {conv[0]}'s A "
                                                          "and B transposed; use True, 'gaussian', 'orthogonal' or "
                                                          "'pissa' on this model")


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
    """target_modules="all-linear" over a model with NF4Linear layers: peft's expansion sees only its own linear
    types (nn.Linear, Conv1D, its adapter layers), not fastft's NF4Linear, so it is resolved here as peft resolves it
    on the dense model: peft's own resolution over the layers left dense (Conv1D ones too, and with transformers 5
    its conversion of MoE experts and routers to target_parameters), plus every NF4 layer peft's rule keeps."""
    if not _is_all_linear(config.target_modules) or not any(isinstance(m, NF4Linear) for m in model.modules()):
        return
    resolved = moe_converted(config, model)
    quantized = _quantized_linear_names(model)
    if _is_all_linear(resolved.target_modules):  # no MoE conversion: peft's full module names
        config.target_modules = set(_maybe_include_all_linear_layers(resolved, model).target_modules) | quantized
        return
    # converted (peft resolves "all-linear" to last name components there; it maps them again when it builds)
    config.target_modules = set(resolved.target_modules) | {name.rsplit(".", 1)[-1] for name in quantized}
    config.target_parameters = resolved.target_parameters
    config.rank_pattern, config.alpha_pattern = resolved.rank_pattern, resolved.alpha_pattern


def _is_all_linear(targets) -> bool:
    return isinstance(targets, str) and targets.lower() == "all-linear"  # peft's test


def _quantized_linear_names(model: nn.Module) -> set[str]:
    """The names of the NF4 layers peft's "all-linear" would adapt were they the nn.Linear (or Conv1D) layers they
    replaced: all but the output layer (the head of a SEQ_CLS model, which peft also leaves out, cannot be NF4 here:
    peft trains it whole, refused by check_modules_to_save_dense); one inside a peft adapter layer counts under that
    layer's name."""
    get_output = getattr(model, "get_output_embeddings", None)
    output = get_output() if callable(get_output) else None
    output = output.get_base_layer() if isinstance(output, BaseTunerLayer) else output
    return {name for name, m in modules_as_bases(model) if isinstance(m, NF4Linear) and m is not output}


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
    return [(name, module) for name, module in modules_as_bases(model)
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
    built = _as_peft_builds(config, model)
    targeted = targeted_modules(built, model, TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING)
    parameters = _targeted_parameter_names(built, model)
    names = [name for name, _ in model.named_modules(remove_duplicate=False) if name]
    _check_defaults_kept(config, built, model, targeted or parameters)
    if targeted == [] and not parameters and targets not in (None, "all-linear", DUMMY_TARGET_MODULES):
        shown = sorted(targets) if isinstance(targets, (set, list, tuple)) else targets  # peft's "no LoRA layers"
        hints = _target_hints(_unmatched_targets(targets, names), names)
        if isinstance(targets, str):  # peft reads one string as a regex over whole names, not as a name ending
            hints.append(f"a string is a regex that must match a whole module name (such as {names[-1]!r}): for "
                         f"name endings pass a list, e.g. [{targets!r}]")
        raise ValueError(f"LoraConfig.target_modules={shown!r} matches no module of {type(model).__name__}"
                         f" (with layers_to_transform={config.layers_to_transform!r}); "
                         f"{'; '.join(hints) + ' Its' if hints else 'its'} linear layers are named "
                         f"{_linear_layer_names(model)}")
    warn_unmatched_targets(built, model, names)
    _warn_layer_selection_skips_parameters(config, parameters)
    check_fan_in_fan_out(config, targeted)
    if targeted is not None:
        _check_patterns(config, [name for name, _ in targeted], parameters)
    check_exclude_modules(config, names, "LoraConfig")
    check_modules_to_save(config, names, "LoraConfig")
    check_modules_to_save_dense(config, model, "LoraConfig")


def _warn_layer_selection_skips_parameters(config: LoraConfig, parameters: list[str]) -> None:
    """peft applies layers_to_transform to target_modules only: the parameters target_parameters names (what
    transformers 4's Mixtral expert names become under transformers 5) are adapted in every layer. Said, not
    refused: peft builds the same adapter without a word."""
    if config.layers_to_transform is None or not parameters:
        return
    keep = config.layers_to_transform
    keep = {keep} if isinstance(keep, int) else set(keep)
    patterns = _layers_patterns(config)
    outside = [name for name in parameters if (i := _layer_index(name, patterns)) is not None and i not in keep]
    if outside:
        warnings.warn(f"LoraConfig.layers_to_transform={config.layers_to_transform!r} does not apply to the "
                      f"parameters peft adapts through target_parameters: {len(outside)} outside those layers are "
                      f"adapted too (e.g. {outside[:2]}); to keep to the layers, name their parameters in "
                      f"target_parameters by full path (e.g. {parameters[0]!r})", stacklevel=4)


def _as_peft_builds(config: LoraConfig, model: nn.Module) -> LoraConfig:
    """A copy of `config` with the targets peft builds from it: "all-linear" over NF4 layers expanded
    (_expand_all_linear), and peft's conversion for the MoE models transformers 5 rebuilt (Mixtral's transformers 4
    expert names 'w1'/'w3'/'w2' and its router 'gate' become target_parameters)."""
    built = config_copy(config)
    try:
        _expand_all_linear(built, model)
        convert_moe_targets(built, model)  # a second conversion (after _expand_all_linear's) changes nothing
    except ValueError as e:  # peft's: 'w1' without 'w3', which transformers 5 fused into one parameter
        targets = config.target_modules
        raise _config_error("target_modules", sorted(targets) if isinstance(targets, set) else targets,
                            f"peft converts it for transformers 5's {type(model).__name__} and cannot: {e}") from None
    return built


def _targeted_parameter_names(config: LoraConfig, model: nn.Module) -> list[str]:
    """'<module>.<parameter>' of each parameter config.target_parameters names (peft's LoRA on a parameter): the
    name peft matches rank/alpha pattern keys against, as it matches a module's name for a module."""
    return [f"{name}.{param}" for name, module in modules_as_bases(model) if name
            for param in targeted_parameters(config, name, module)]


def _check_defaults_kept(config: LoraConfig, built: LoraConfig, model: nn.Module, found) -> None:
    """target_modules=None (peft's defaults for the model type) that peft's MoE conversion turns into no targets
    (peft 0.21 on transformers 5's Mixtral): peft would refuse it with "No `target_modules` passed"."""
    if config.target_modules is None and built.target_modules is not None and not found:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        defaults = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(model_type)
        raise ValueError(f"LoraConfig.target_modules=None: peft's conversion of the config for {model_type!r} under "
                         "transformers 5 (its MoE layers were rebuilt) drops peft's default targets for it, so peft "
                         f"would adapt nothing; pass them explicitly, target_modules={sorted(defaults or ())!r}, or "
                         "name the layers meant")


def warn_unmatched_targets(config, model: nn.Module, names: list[str], label: str = "LoraConfig",
                           layer: str = "LoRA", stacklevel: int = 5) -> None:
    """One warning naming the target_modules list entries that match no module (peft's rule: the name or a dotted
    suffix of it), with a did-you-mean: peft adds nothing for them. Not an error: a list may name the layers of
    several architectures (Llama's and GPT-2's), on purpose."""
    unmatched = _unmatched_targets(config.target_modules, names)
    if not unmatched:
        return
    hints = _target_hints(unmatched, names)
    warnings.warn(f"{label}.target_modules entries {unmatched} match no module of {type(model).__name__}, so they "
                  f"get no {layer} layer (peft adapts the other entries){'; ' + '; '.join(hints) if hints else '.'} "
                  f"Its linear layers are named {_linear_layer_names(model)}", UnmatchedTargetWarning,
                  stacklevel=stacklevel)


def _unmatched_targets(targets, names: list[str]) -> list[str]:
    """The target_modules list entries that name no module (peft's rule: the name or a dotted suffix of it); none
    for peft's defaults (None) or a regex (a string)."""
    if targets is None or isinstance(targets, str):
        return []
    return [t for t in (sorted(targets) if isinstance(targets, set) else targets)
            if not any(names_module(t, n) for n in names)]


def _target_hints(unmatched: list[str], names: list[str]) -> list[str]:
    return [f"{t!r}: {hint}" for t in unmatched if (hint := name_hint(t, names)).startswith("did you mean")]


def _linear_layer_names(model: nn.Module) -> list[str]:
    """The last name components of the layers peft adapts as linear ones: nn.Linear, transformers' Conv1D (GPT-2)
    and fastft's NF4Linear (QLoRA)."""
    return sorted({n.rsplit(".", 1)[-1] for n, m in modules_as_bases(model) if in_out_features(m) is not None})


def _layers_patterns(config: LoraConfig) -> list[str]:
    """config.layers_pattern as a list (peft takes a name or a list)."""
    patterns = config.layers_pattern
    return [patterns] if isinstance(patterns, str) else list(patterns or ())


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
    # exclude_modules left out too: a layer whose matches it removes still exists (peft adapts the other layers)
    unfiltered.layers_to_transform, unfiltered.layers_pattern, unfiltered.exclude_modules = None, None, None
    targeted = targeted_modules(unfiltered, model, TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING)
    candidates = [name for name, _ in targeted or ()]
    if not candidates:
        return  # target_modules matches nothing at all: named by _check_targets
    kind, lists = type(model).__name__, _layer_lists(candidates)
    patterns = _layers_patterns(config)
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


def _trained_whole(config, model: nn.Module):
    """(entry, module name, module, task type or None) of every module peft trains and saves whole under `config`:
    each modules_to_save entry's, then each head peft adds for the task (its task type given) not named already."""
    task = getattr(config.task_type, "value", config.task_type)
    given = tuple(getattr(config, "modules_to_save", None) or ())
    added = tuple(e for e in _PEFT_HEAD_NAMES.get(task, ()) if e not in given)
    for entry in (*given, *added):
        for name, module in model.named_modules():
            if name.endswith(entry):
                yield entry, name, module, task if entry in added else None


def _holds_nf4(module: nn.Module) -> bool:
    return any(isinstance(m, NF4Linear) for m in module.modules())


def _nf4_module_to_save(config, model: nn.Module) -> tuple[str, str] | None:
    """(entry, module name) of the first module peft would train whole (_trained_whole) that is or holds an NF4
    layer: peft trains and saves such a module as a whole copy, which a frozen 4-bit weight cannot be, and finds that
    only after building LoRA layers inside the user's model."""
    return next(((entry, name) for entry, name, module, _ in _trained_whole(config, model) if _holds_nf4(module)),
                None)


def _keep_dense(entry: str) -> str:
    return (f"keep it dense when quantizing: fastft.quantize_model(model, skip=[{entry!r}]) (a model "
            f"transformers quantizes: BitsAndBytesConfig(..., llm_int8_skip_modules=[{entry!r}]))")


def refuse_nf4_trained_whole(label: str, entry: str, name: str, module: nn.Module, task_type=None) -> None:
    """ValueError when `module`, which a method trains and saves whole (a modules_to_save entry, or the head
    task_type adds), is or holds an NF4 layer: a frozen 4-bit weight can be neither, and the method found that only
    after building its layers inside the user's model (NF4Weight's "frozen: it cannot require gradients")."""
    if not _holds_nf4(module):
        return
    what = (f"{label}.task_type={task_type!r} trains its head {entry!r} whole:" if task_type else
            f"{label}.modules_to_save entry {entry!r} names")
    raise ValueError(f"{what} '{name}', which is or holds an NF4 (QLoRA) layer: its 4-bit weight cannot be trained "
                     f"or saved whole. To train it, {_keep_dense(entry)}"
                     + ("; or adapt it with LoRA instead (target_modules)" if label == "LoraConfig" else ""))


def check_modules_to_save_dense(config, model: nn.Module, label: str) -> None:
    """refuse_nf4_trained_whole for every module peft would train whole under `config` (LoRA's, IA3's)."""
    for entry, name, module, task in _trained_whole(config, model):
        refuse_nf4_trained_whole(label, entry, name, module, task)


def _check_patterns(config: LoraConfig, modules: list[str], parameters: list[str]) -> None:
    """Every rank_pattern / alpha_pattern key must match a module or a parameter peft adapts, as peft matches it
    (get_pattern_key: the key, a regex, matches the end of the name, from a dot on; a parameter's name is
    '<module>.<parameter>'); one that matches nothing would be ignored. (peft's own warning about ignored keys looks at
    modules only, so it also names keys that did set a parameter's rank.)"""
    for field in ("rank_pattern", "alpha_pattern"):
        for key in getattr(config, field) or {}:
            if not any(re.match(rf"(.*\.)?({key})$", n) for n in (*modules, *parameters)):  # peft's get_pattern_key
                raise ValueError(f"LoraConfig.{field} key {key!r} matches none of the targeted modules "
                                 f"(e.g. {modules[:3]}){_parameters_named(parameters)}; "
                                 f"{_pattern_hint(key, parameters)}fix the key or drop it")


def _parameters_named(parameters: list[str]) -> str:
    if not parameters:
        return ""
    kinds = sorted({".".join(p.rsplit(".", 2)[-2:]) for p in parameters})
    return (f" nor parameters (LoRA on parameters: {kinds}, e.g. {parameters[0]!r}; a key matches the end of "
            "'<module>.<parameter>')")


def _pattern_hint(key: str, parameters: list[str]) -> str:
    """A key naming the module that holds a targeted parameter ('gate' for Mixtral's router 'mlp.gate.weight')."""
    for name in parameters:
        if re.match(rf"(.*\.)?({key})\.[^.]+$", name):
            return f"did you mean {key + '.' + name.rsplit('.', 1)[-1]!r}? "
    return ""


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
_PEFT_HEAD_NAMES = {"SEQ_CLS": ("classifier", "score"), "TOKEN_CLS": ("classifier", "score"),
                    "QUESTION_ANS": ("qa_outputs",)}


def check_modules_to_save(config, names: list[str], label: str) -> None:
    """Every modules_to_save entry must match some module as peft matches it (the name ends with it); one that
    matches nothing leaves that module frozen and unsaved (a classification head not trained)."""
    task = getattr(config.task_type, "value", config.task_type)
    added = _PEFT_HEAD_NAMES.get(task, ())
    for entry in getattr(config, "modules_to_save", None) or ():
        if entry not in added and not any(n.endswith(entry) for n in names):
            raise ValueError(f"{label}.modules_to_save entry {entry!r} matches no module of the model, so nothing "
                             f"would be trained or saved for it; {name_hint(entry, names)}")


def _quantized_parameter_targets(config, model: nn.Module) -> list[str]:
    """The NF4 layers holding a parameter config.target_parameters names other than their weight (peft would wrap
    their 4-bit storage). A named weight is fine: peft dispatches the NF4 layer to a QLoRA layer, whose x·Aᵀ·Bᵀ
    equals the LoRA on the parameter (an MoE router's "gate.weight", which peft's "all-linear" conversion names)."""
    return [name for name, module in modules_as_bases(model)
            if isinstance(module, NF4Linear) and set(targeted_parameters(config, name, module)) - {"weight"}]


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
                         f"model, or to train it, {_keep_dense(found[0])}")
    if any(isinstance(m, NF4Linear) for m in base.modules()):
        conv1d = any(getattr(m, "from_conv1d", False) for m in base.modules())  # GPT-2: fan_in_fan_out fits
        for field in (*_UNSUPPORTED_FIELDS, *(() if conv1d else ("fan_in_fan_out",))):
            value = getattr(config, field, None)
            if field == "target_parameters" and not _quantized_parameter_targets(config, base):
                continue  # peft's LoRA on parameters left dense (Mixtral's experts, router): as on the dense model
            if field != "use_dora" and value not in (None, False):
                raise ValueError(f"load_adapter: {path} has LoraConfig.{field}={value!r}, which fastft's QLoRA "
                                 "layers (NF4 base) do not compute or merge; load it onto the unquantized model")

