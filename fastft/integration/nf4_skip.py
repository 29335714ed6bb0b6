"""Which linear layers an NF4 model keeps dense, shared by quantize_model and load_nf4_model: transformers +
bitsandbytes' own rule (`default_skip`), the user's `skip` entries, and layers whose forward is not x·Wᵀ + b."""
from __future__ import annotations

from torch import nn

from fastft.integration.module_names import name_hint
from fastft.modules.nf4_linear import is_conv1d

DEFAULT_SKIP = ("lm_head",)


def skipped(name: str, skip) -> bool:
    """`skip` entries match a module name or any run of its dotted components ("lm_head", "mlp.down_proj")."""
    padded = f".{name}."
    return any(name == s or f".{s}." in padded for s in skip)


def kept_by_default(name: str, defaults) -> bool:
    """default_skip's entries (and a saved llm_int8_skip_modules) match as transformers' should_convert_module
    matches them for bitsandbytes: the name, a module under it ("lm_head" keeps "lm_head.dense"), or a name ending in
    it ("wo"; with transformers 5 at any character: "classifier" keeps DistilBERT's "pre_classifier" dense too, and a
    checkpoint holding it NF4 failed transformers' load), not any run inside a name (GIT's head `output` kept every
    layer's `output.dense` dense). Without transformers: the name, under it, or ending in it at a dot."""
    if not defaults:
        return False
    try:
        from transformers.quantizers.quantizers_utils import should_convert_module
    except ImportError:
        return any(name == d or name.startswith(d + ".") or name.endswith("." + d) for d in defaults)
    return not should_convert_module(name, list(defaults))


def kept_dense(name: str, skip, defaults) -> bool:
    return skipped(name, skip) or kept_by_default(name, defaults)


def quantizable(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def default_skip(model: nn.Module) -> tuple[str, ...]:
    """The modules transformers + bitsandbytes leave dense when they quantize `model`: transformers'
    get_keys_to_not_convert (the output embeddings, tied weights, the last module: lm_head, a classifier's score)
    and the model's `_keep_in_fp32_modules` (T5's wo); lm_head always. Quantizing them would give a checkpoint
    transformers cannot load, and a head peft's modules_to_save cannot train."""
    names = set(DEFAULT_SKIP)
    try:
        from transformers import PreTrainedModel
        from transformers.quantizers.base import get_keys_to_not_convert
    except ImportError:  # a plain torch model: lm_head only
        return tuple(sorted(names))
    if isinstance(model, PreTrainedModel):
        # a parameter's name stands for its module (the last parameter may be a bias; LongCat-Flash keeps
        # "classifier.weight" in fp32: its router reads that weight itself)
        names.update(_module_of(n) for n in get_keys_to_not_convert(model))
        names.update(_module_of(n) for n in getattr(model, "_keep_in_fp32_modules", None) or ())
    return tuple(sorted(names))


def _module_of(name: str) -> str:
    return name.removesuffix(".weight").removesuffix(".bias")


def skip_entries(skip) -> tuple[str, ...]:
    return (skip,) if isinstance(skip, str) else tuple(skip or ())  # one name, not its characters


def check_skip(model: nn.Module, skip, where: str) -> None:
    """A skip entry that matches no module is a typo that would quantize the layer it meant: refuse it, suggesting
    names from the modules' last parts. DEFAULT_SKIP's entries are let through (skipped anyway; a model without an
    lm_head is fine)."""
    names = [n for n, _ in model.named_modules() if n]
    for entry in skip:
        if entry in DEFAULT_SKIP or any(skipped(n, (entry,)) for n in names):
            continue
        raise ValueError(f"{where}: skip entry {entry!r} matches no module of {type(model).__name__}; "
                         f"{name_hint(entry, names)}")


def plain_forward_layers(model: nn.Module) -> set[int]:
    """ids of `model`'s layers that run nn.Linear's own forward (or are a Conv1D), as NF4Linear computes. A subclass
    with a forward of its own stays dense even when that forward computes the same (Falcon's FalconLinear):
    transformers + bitsandbytes replace nn.Linear itself only, so they could not load such a layer saved NF4.
    nn.MultiheadAttention's out_proj too: its owner reads the weight directly."""
    owned = {id(c) for m in model.modules() if isinstance(m, nn.MultiheadAttention) for c in m.children()}
    return {id(m) for m in model.modules()
            if id(m) not in owned and (is_conv1d(m) or type(m).forward is nn.Linear.forward)}
