"""Every fine-tuning method behind one entry point: `apply_method(model, name, options)`.

The training CLI (`fastft train --method`), the benchmark (`fastft bench`) and the study (`fastft study`)
all build their models here, so a method is added once. Each method has its own room
(`fastft/integration/methods/<method>.py` or a package: config accepted, layer, injection — peft's shape);
this module is the table that names them. `implementation="peft"` builds the same method with peft's own
code (the accuracy and speed anchor), where peft has the method.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from fastft.arguments import check_model

METHODS = ("lora", "qlora", "dora", "prefix", "prompt", "ia3", "adapter", "full")
IMPLEMENTATIONS = ("fastft", "peft")
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ALL_LINEAR_SHORTHAND = "all-linear"  # peft's: every linear layer but the output head, whatever the architecture


@dataclass
class MethodOptions:
    """The knobs of every method; each method reads the ones it has."""
    rank: int = 16                      # lora, qlora, dora
    alpha: float = 32.0                 # lora, qlora, dora
    dropout: float = 0.0                # lora, qlora, dora: dropout on the adapter input
    rslora: bool = False                # lora, qlora, dora: scale alpha/sqrt(r) instead of alpha/r
    # lora, qlora, dora: module name endings, or one string, which peft reads as a regex over full names
    target_modules: tuple[str, ...] | str = ALL_LINEAR
    num_virtual_tokens: int = 32        # prefix, prompt
    ia3_target_modules: tuple[str, ...] | str = ("k_proj", "v_proj", "down_proj")   # ia3 (peft's Llama default)
    ia3_feedforward_modules: tuple[str, ...] | str = ("down_proj",)                  # ia3: scale the input, not output
    adapter_size: int = 64              # adapter: bottleneck width
    adapter_placement: str = "pfeiffer"  # adapter: "pfeiffer" (after the MLP) or "houlsby" (after attn and MLP)
    adapter_activation: str = "relu"    # adapter: relu, silu, gelu_tanh or tanh
    # adapter: the sublayer output projections it follows, by the last part of the module name (Llama's default);
    # a model whose names differ (BERT's `dense`) names its own
    adapter_attn_output_modules: tuple[str, ...] | str = ("o_proj",)  # BottleneckAdapterConfig's matching rules
    adapter_mlp_output_modules: tuple[str, ...] | str = ("down_proj",)
    quant_type: str = "nf4"             # qlora


def _lora_config(options: MethodOptions, **overrides):
    from peft import LoraConfig

    return LoraConfig(r=options.rank, lora_alpha=options.alpha, lora_dropout=options.dropout,
                      use_rslora=options.rslora, target_modules=peft_targets(options.target_modules),
                      task_type="CAUSAL_LM", **overrides)


def peft_targets(targets):
    """A target_modules value as peft's configs take it: a string as it is (peft matches it as a regex against full
    module names; "all-linear" its shorthand), not split into one-letter names as list("q_proj") would; a sequence
    of name endings as a list, ["all-linear"] as the shorthand."""
    if isinstance(targets, str):
        return targets
    targets = list(targets)
    return ALL_LINEAR_SHORTHAND if targets == [ALL_LINEAR_SHORTHAND] else targets


def _apply_lora(model, options, implementation):
    import peft

    import fastft

    config = _lora_config(options)
    return fastft.get_peft_model(model, config) if implementation == "fastft" else peft.get_peft_model(model, config)


def _apply_qlora(model, options, implementation):
    if implementation == "peft":
        raise NotImplementedError("qlora with implementation='peft' needs a bitsandbytes-quantized model: load it "
                                  "with transformers' BitsAndBytesConfig, then apply method 'lora' with peft")
    import fastft

    fastft.quantize_model(model, options.quant_type)  # lm_head and heads stay dense (default_skip)
    return _apply_lora(model, options, implementation)


def _apply_full(model, options, implementation):
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def _apply_dora(model, options, implementation):
    import peft

    import fastft

    config = _lora_config(options, use_dora=True)
    return fastft.get_peft_model(model, config) if implementation == "fastft" else peft.get_peft_model(model, config)


def _ia3_config(options: MethodOptions):
    from peft import IA3Config

    return IA3Config(target_modules=peft_targets(options.ia3_target_modules),
                     feedforward_modules=peft_targets(options.ia3_feedforward_modules), task_type="CAUSAL_LM")


def _apply_ia3(model, options, implementation):
    import peft

    import fastft

    config = _ia3_config(options)
    return fastft.get_peft_model(model, config) if implementation == "fastft" else peft.get_peft_model(model, config)


def _apply_prefix(model, options, implementation):
    import peft

    import fastft

    config = peft.PrefixTuningConfig(num_virtual_tokens=options.num_virtual_tokens, task_type="CAUSAL_LM")
    return fastft.get_peft_model(model, config) if implementation == "fastft" else peft.get_peft_model(model, config)


def _apply_prompt(model, options, implementation):
    import peft

    import fastft

    config = peft.PromptTuningConfig(num_virtual_tokens=options.num_virtual_tokens, task_type="CAUSAL_LM")
    return fastft.get_peft_model(model, config) if implementation == "fastft" else peft.get_peft_model(model, config)


def _apply_adapter(model, options, implementation):
    if implementation == "peft":
        raise NotImplementedError("method 'adapter' has no implementation='peft': peft has no bottleneck adapters "
                                  "(fastft's own room is the only one)")
    from fastft.integration.methods.adapter import BottleneckAdapterConfig, get_adapter_model

    config = BottleneckAdapterConfig(size=options.adapter_size, placement=options.adapter_placement,
                                     activation=options.adapter_activation,
                                     attn_output_modules=options.adapter_attn_output_modules,
                                     mlp_output_modules=options.adapter_mlp_output_modules)
    return get_adapter_model(model, config)


_APPLY = {"lora": _apply_lora, "qlora": _apply_qlora, "full": _apply_full, "dora": _apply_dora, "ia3": _apply_ia3,
          "prefix": _apply_prefix, "prompt": _apply_prompt, "adapter": _apply_adapter}

# Config type name -> (room module, injection function). LoraConfig without DoRA stays in peft_lora.
_ROOMS = {
    "IA3Config": ("fastft.integration.methods.ia3", "get_ia3_model"),
    "PrefixTuningConfig": ("fastft.integration.methods.prefix", "get_prefix_model"),
    "PromptTuningConfig": ("fastft.integration.methods.prompt", "get_prompt_model"),
    "PromptEncoderConfig": ("fastft.integration.methods.prompt", "get_prompt_model"),
    "BottleneckAdapterConfig": ("fastft.integration.methods.adapter", "get_adapter_model"),
}
# peft_type of a saved adapter -> (room module, load function); LORA (and DoRA) load in peft_lora.
_LOADERS = {
    "IA3": ("fastft.integration.methods.ia3", "load_ia3_adapter"),
    "PREFIX_TUNING": ("fastft.integration.methods.prefix", "load_prefix_adapter"),
    "PROMPT_TUNING": ("fastft.integration.methods.prompt", "load_prompt_adapter"),
    "P_TUNING": ("fastft.integration.methods.prompt", "load_prompt_adapter"),
}


def _room(table, key):
    import importlib

    module, name = table[key]
    return getattr(importlib.import_module(module), name)


def supported_configs() -> list[str]:
    return ["LoraConfig", "LoraConfig(use_dora=True)", *_ROOMS]


def get_method_model(model: nn.Module, config, adapter_name: str = "default", **kwargs):
    """fastft.get_peft_model for every config that is not plain LoRA: dispatch on the config type."""
    from peft import LoraConfig

    if isinstance(config, LoraConfig):
        if not config.use_dora:
            import fastft

            return fastft.get_peft_model(model, config, adapter_name=adapter_name, **kwargs)
        from fastft.integration.methods.dora import get_dora_model

        return get_dora_model(model, config, adapter_name=adapter_name, **kwargs)
    name = type(config).__name__
    if name not in _ROOMS:
        raise TypeError(f"fastft.get_peft_model: {name} is not supported by fastft; supported configs: "
                        f"{', '.join(supported_configs())} (use peft.get_peft_model for other methods)")
    return _room(_ROOMS, name)(model, config, adapter_name=adapter_name, **kwargs)


def load_method_adapter(model: nn.Module, path, adapter_name: str = "default", is_trainable: bool = False):
    """Load a saved non-LoRA adapter through its room; None for a LoRA/DoRA adapter (peft_lora loads it)."""
    from pathlib import Path

    path = Path(path)
    if not (path / "adapter_config.json").is_file():
        return None  # peft_lora reports the missing file
    from fastft.integration.adapter_files import read_peft_config
    from fastft.integration.base_layers import is_peft_model
    from fastft.integration.methods.adapter import is_bottleneck_adapter, load_bottleneck_adapter
    from fastft.integration.peft_lora import refuse_peft_model

    if is_bottleneck_adapter(path):
        return load_bottleneck_adapter(model, path, adapter_name, is_trainable)
    if not is_peft_model(model):  # a PeftModel takes another adapter; fastft's adapter models do not
        refuse_peft_model(model, "load_adapter")
    config = read_peft_config(path)
    peft_type = getattr(config.peft_type, "value", config.peft_type)
    if peft_type == "LORA":
        return None
    if peft_type not in _LOADERS:
        raise TypeError(f"load_adapter: {path} holds a {type(config).__name__} adapter, which fastft does not "
                        f"support; supported: {', '.join(supported_configs())}")
    return _room(_LOADERS, peft_type)(model, path, config, adapter_name, is_trainable)


def apply_method(model: nn.Module, method: str, options: MethodOptions | None = None, *,
                 implementation: str = "fastft") -> nn.Module:
    """Prepare `model` (a transformers causal LM) for training with `method`; returns the model to train
    (a PeftModel for peft-style methods, the model itself for full fine-tuning). Only the method's
    parameters require grad afterwards."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    from fastft.integration.peft_lora import quiet_checkpointing_deprecation, refuse_peft_model

    check_model(model, "apply_method")
    if options is not None and not isinstance(options, MethodOptions):
        raise TypeError(f"apply_method: `options` must be a fastft.MethodOptions (e.g. MethodOptions(rank=16)) or "
                        f"None, got {type(options).__name__}" + (": pass MethodOptions(**options)"
                                                                 if isinstance(options, dict) else ""))
    refuse_peft_model(model, "apply_method")
    try:
        with quiet_checkpointing_deprecation():  # implementation="peft" calls peft.get_peft_model itself
            return _APPLY[method](model, options or MethodOptions(), implementation)
    except ValueError as e:  # the method's config (or peft) names its own fields: say which option sets them
        options_named = dict.fromkeys(option for field, option in _OPTION_OF_FIELD.get(method, {}).items()
                                      if field in str(e))
        if options_named:
            e.add_note(f"apply_method({method!r}): set by " + ", ".join(
                f"MethodOptions.{option} (fastft train --{option.replace('_', '-')})" for option in options_named))
        raise


# what each method's config calls the fields MethodOptions sets, for its errors
_OPTION_OF_FIELD = {
    "ia3": {"target_modules": "ia3_target_modules", "Target modules": "ia3_target_modules",
            "feedforward_modules": "ia3_feedforward_modules"},
    "adapter": {f"BottleneckAdapterConfig.{field}": f"adapter_{field}"
                for field in ("size", "placement", "activation", "attn_output_modules", "mlp_output_modules")},
}
