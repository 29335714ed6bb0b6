"""The layers of a model as peft's adapters see them: a peft adapter layer counts as the layer it wraps, so the
checks of a config and of a saved adapter read the same names and shapes before and after adapters are added."""
from __future__ import annotations

from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from transformers.pytorch_utils import Conv1D

from fastft.modules.nf4_linear import NF4Linear


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
