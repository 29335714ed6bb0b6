"""Every fine-tuning method behind one entry point: `apply_method(model, name, options)`.

The training CLI (`fastft train --method`), the benchmark (`fastft bench`) and the study (`fastft study`)
all build their models here, so a method is added once. Each method has its own room
(`fastft/integration/methods/<method>.py` or a package: config accepted, layer, injection — peft's shape);
this module is the table that names them. `implementation="peft"` builds the same method with peft's own
code (the accuracy and speed anchor), where peft has the method.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

METHODS = ("lora", "qlora", "dora", "prefix", "prompt", "ia3", "adapter", "full")
IMPLEMENTATIONS = ("fastft", "peft")
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class MethodOptions:
    """The knobs of every method; each method reads the ones it has."""
    rank: int = 16                      # lora, qlora, dora
    alpha: float = 32.0                 # lora, qlora, dora
    dropout: float = 0.0                # lora, qlora, dora: dropout on the adapter input
    rslora: bool = False                # lora, qlora, dora: scale alpha/sqrt(r) instead of alpha/r
    target_modules: tuple[str, ...] = ALL_LINEAR   # lora, qlora, dora
    num_virtual_tokens: int = 32        # prefix, prompt
    ia3_target_modules: tuple[str, ...] = ("k_proj", "v_proj", "down_proj")   # ia3 (peft's Llama default)
    ia3_feedforward_modules: tuple[str, ...] = ("down_proj",)                  # ia3: scale the input, not output
    adapter_size: int = 64              # adapter: bottleneck width
    adapter_placement: str = "pfeiffer"  # adapter: "pfeiffer" (after the MLP) or "houlsby" (after attn and MLP)
    quant_type: str = "nf4"             # qlora
    extra: dict = field(default_factory=dict)  # method-specific extras, validated by the method's room


def _lora_config(options: MethodOptions, **overrides):
    from peft import LoraConfig

    return LoraConfig(r=options.rank, lora_alpha=options.alpha, lora_dropout=options.dropout,
                      use_rslora=options.rslora, target_modules=list(options.target_modules),
                      task_type="CAUSAL_LM", **overrides)


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

    fastft.quantize_model(model, options.quant_type, skip=["lm_head"])
    return _apply_lora(model, options, implementation)


def _apply_full(model, options, implementation):
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def _not_yet(name):
    def apply(model, options, implementation):
        raise NotImplementedError(f"method {name!r} has no fastft room yet")
    return apply


_APPLY = {"lora": _apply_lora, "qlora": _apply_qlora, "full": _apply_full,
          **{m: _not_yet(m) for m in ("dora", "prefix", "prompt", "ia3", "adapter")}}


def apply_method(model: nn.Module, method: str, options: MethodOptions | None = None, *,
                 implementation: str = "fastft") -> nn.Module:
    """Prepare `model` (a transformers causal LM) for training with `method`; returns the model to train
    (a PeftModel for peft-style methods, the model itself for full fine-tuning). Only the method's
    parameters require grad afterwards."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    return _APPLY[method](model, options or MethodOptions(), implementation)
