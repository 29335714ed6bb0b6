"""The layers of a model as peft's adapters see them: a peft adapter layer counts as the layer it wraps, so the
checks of a config and of a saved adapter read the same names and shapes before and after adapters are added; and a
config's targets as peft converts them for the MoE models transformers 5 rebuilt."""
from __future__ import annotations

import contextlib
import copy

from peft import PeftModel
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from transformers.pytorch_utils import Conv1D

from fastft.modules.nf4_linear import NF4Linear

try:  # peft with transformers 5 converts configs and adapter files for the MoE models transformers 5 rebuilt
    from peft.import_utils import is_transformers_ge_v5
    from peft.utils import transformers_weight_conversion as moe_conversion
    if not is_transformers_ge_v5:
        moe_conversion = None
except ImportError:  # older peft does not
    moe_conversion = None


def is_peft_model(model) -> bool:
    """Whether `model` is a peft PeftModel holding peft's adapters: not fastft's BottleneckAdapterModel, a PeftModel
    only so that transformers' Trainer saves and reloads its adapter (fastft.integration.methods.adapter.model)."""
    from fastft.integration.methods.adapter.model import BottleneckAdapterModel

    return isinstance(model, PeftModel) and not isinstance(model, BottleneckAdapterModel)


def transformers_model(model: nn.Module) -> nn.Module:
    """The model inside a PeftModel (`model` itself otherwise). peft's get_base_model() reads the active adapter's
    config, which is gone once delete_adapter removed the last one: adding or loading one then raised a KeyError
    (peft's own add_adapter reads base_model.model)."""
    if not isinstance(model, PeftModel):
        return model
    if model.active_adapter in model.peft_config:
        return model.get_base_model()
    return getattr(model.base_model, "model", model.base_model)


def modules_as_bases(model: nn.Module):
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


def in_out_features(layer: nn.Module) -> tuple[int, int] | None:
    """(in_features, out_features) of a linear layer (transformers' Conv1D, GPT-2's, calls them nx and nf); None
    for other kinds (embeddings, convolutions), whose tensors peft checks itself."""
    if isinstance(layer, (nn.Linear, NF4Linear)):
        return layer.in_features, layer.out_features
    if isinstance(layer, Conv1D):
        return layer.nx, layer.nf
    return None


def targeted_parameters(config, name: str, module: nn.Module) -> list[str]:
    """The parameters of `module` (named `name`, a base layer) that config.target_parameters names (peft's LoRA on a
    parameter, e.g. Mixtral's fused experts), matched as peft matches them (the full name or a dotted suffix of it),
    in the order peft wraps them."""
    targets = getattr(config, "target_parameters", None) or ()
    return [param for param, _ in module.named_parameters(recurse=False)
            if any(f"{name}.{param}" == t or f"{name}.{param}".endswith(f".{t}") for t in targets)]


def convert_moe_targets(config, model: nn.Module) -> None:
    """peft's conversion of a LoRA config, in place, for the MoE models transformers 5 rebuilt (Mixtral: the experts
    fused into 3-D parameters, the router a custom module): the transformers 4 targets ('w1', 'w3', 'w2', 'gate',
    and what "all-linear" meant there) become target_parameters ('gate_up_proj', 'down_proj', 'gate.weight'), with
    rank/alpha patterns doubling r and alpha on the fused gate_up_proj. peft runs it before it matches anything (when
    it builds an adapter, and on loading one), so checks made on the converted config see what peft will build."""
    if moe_conversion is not None and hasattr(getattr(model, "config", None), "model_type"):
        moe_conversion.convert_peft_config_for_transformers(config, model=model, conversions=None)


def config_copy(config):
    """A shallow copy of a LoRA config with rank/alpha patterns of its own: what a conversion or expansion may
    rewrite in place, `config` untouched."""
    copied = copy.copy(config)
    copied.rank_pattern = dict(getattr(config, "rank_pattern", None) or {})
    copied.alpha_pattern = dict(getattr(config, "alpha_pattern", None) or {})
    return copied


def moe_converted(config, model: nn.Module):
    """A copy of `config` (config_copy) converted as convert_moe_targets converts it."""
    converted = config_copy(config)
    convert_moe_targets(converted, model)
    return converted


@contextlib.contextmanager
def attribute_set(modules, name: str, value):
    """Each module's attribute `name` set to `value` inside the block, each put back as it was after (an adapter
    layer's disabled flag: the model without its adapters, DPO's reference, leaving a layer the user disabled so)."""
    modules = list(modules)
    before = [getattr(m, name) for m in modules]
    for m in modules:
        setattr(m, name, value)
    try:
        yield
    finally:
        for m, was in zip(modules, before):
            setattr(m, name, was)
