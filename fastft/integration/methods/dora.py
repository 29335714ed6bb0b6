"""DoRA's room: `LoraConfig(use_dora=True)` accepted, a fused DoRA layer, injection through peft.

Config: peft's LoraConfig with use_dora=True. Everything plain LoRA accepts, minus lora_bias (refused naming the
field). Conv1D layers (GPT-2, fan_in_fan_out=True, set by peft) run peft's DoRA forward, unfused, as in plain LoRA.
Layer: `FusedDoraLinear` / `FusedQDoraLinear` — peft's LoRA Linear (DoRA variant, same state: lora_A, lora_B,
lora_magnitude_vector) whose forward for one active DoRA adapter is `fastft.ops.dora_linear` (fused GEMM with σ
as a column-scale epilogue; the row norm ‖W + s·B·A‖ recomputed each call, one pass over W, nothing cached).
Other cases (several adapters, disabled, merged) take peft's forward. NF4 bases: peft's DoRA cannot read an
NF4Weight, so `FusedQDoraLinear` initialises the magnitude from the dequantized rows (fastft.ops.dora.dora_row_norm)
and only supports the fused forward.
Injection: peft builds the model; `patch_peft` swaps the layers (peft's save format, keys
`...lora_magnitude_vector`, unchanged).
"""
from __future__ import annotations

import copy
from typing import Any

import torch
from peft import LoraConfig
from peft.tuners.lora.dora import DoraLinearLayer
from peft.tuners.lora.variants import DoraLinearVariant
from torch import nn

from fastft.modules.lora import FusedLoraLinear, adapters_called_as_is, default_backend
from fastft.modules.nf4_linear import NF4Linear
from fastft.modules.qlora import FusedQLoraLinear
from fastft.ops.dora import dora_linear, dora_row_norm
from fastft.ops.shared import in_compute_dtype

# LoraConfig fields refused with DoRA (fan_in_fan_out is not: Conv1D layers take peft's forward, as in plain LoRA).
_DORA_UNSUPPORTED = {
    "lora_bias": "peft's DoRA with a LoRA bias adds it outside the magnitude scale; the fused op has no such term",
}


def validate_dora_config(config, model: nn.Module) -> None:
    """ValueError naming the field for a DoRA option fastft cannot fuse; then plain LoRA's checks."""
    from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as defaults

    from fastft.integration.lora_config import check_fan_in_fan_out, targeted_modules, validate_lora_config

    if not isinstance(config, LoraConfig) or not config.use_dora:
        raise TypeError(f"validate_dora_config expects a peft.LoraConfig with use_dora=True, got {config!r}")
    for field, why in _DORA_UNSUPPORTED.items():
        value = getattr(config, field, None)
        if value not in (None, False):
            raise ValueError(f"LoraConfig.{field}={value!r} with use_dora=True is not supported by fastft: {why}; "
                             "use peft directly for it")
    if config.fan_in_fan_out:  # named with use_dora here; plain LoRA's checks below would name it without
        check_fan_in_fan_out(config, targeted_modules(config, model, defaults), context=" with use_dora=True")
    plain = copy.copy(config)
    plain.use_dora = False
    validate_lora_config(plain, model)


class _DoraForward:
    """The fused forward for one active DoRA adapter; peft's forward (via the LoRA parent) otherwise."""

    def _dora_operands(self, x, args, kwargs):
        if args or any(v is not None for v in kwargs.values()):
            return None
        if self.disable_adapters or self.merged or self.fan_in_fan_out or not self._base_ok(x):
            return None
        names = [a for a in self.active_adapters if a in self.lora_A]
        if len(names) != 1 or names[0] not in self.lora_magnitude_vector or self.lora_bias.get(names[0], False):
            return None
        name = names[0]
        if isinstance(self.scaling[name], torch.Tensor) \
                or not adapters_called_as_is(names, self.lora_A, self.lora_B, self.lora_dropout,
                                             self.lora_magnitude_vector, device=x.device):
            return None  # as FusedLoraBase: a tensor scaling, hooked adapter modules
        dropout = self.lora_dropout[name]
        if isinstance(dropout, nn.Identity):
            p = 0.0
        elif type(dropout) is nn.Dropout:
            p = dropout.p if dropout.training else 0.0
        else:
            return None
        return (self.lora_A[name].weight, self.lora_B[name].weight, self.lora_magnitude_vector[name].weight,
                self.scaling[name], p)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        operands = self._dora_operands(x, args, kwargs)
        if operands is None:
            return super().forward(x, *args, **kwargs)
        lora_A, lora_B, magnitude, scaling, p = operands
        base = self.get_base_layer()
        args = (base.weight, base.bias, lora_A, lora_B, magnitude, scaling, p)
        if type(base) is NF4Linear:  # QDoRA computes as QLoRA does
            return in_compute_dtype(dora_linear, x, *args, backend=default_backend())
        return dora_linear(x, *args, backend=default_backend())


class FusedDoraLinear(_DoraForward, FusedLoraLinear):
    """DoRA (and plain LoRA adapters beside it) on a dense nn.Linear."""


class _NF4DoraVariant(DoraLinearVariant):
    """peft's DoRA variant with the magnitude initialised from the NF4 weight (peft cannot dequantize ours)."""

    @staticmethod
    def init(module, adapter_name: str, **kwargs: Any) -> None:
        if not module.lora_magnitude_vector:
            module.adapter_layer_names = module.adapter_layer_names[:] + ("lora_magnitude_vector",)
        layer = DoraLinearLayer(fan_in_fan_out=False)
        lora_A, lora_B = module.lora_A[adapter_name].weight, module.lora_B[adapter_name].weight
        weight = module.get_base_layer().weight  # the norm in its compute dtype, as the fused forward forms it
        norm = dora_row_norm(weight, lora_A, lora_B, module.scaling[adapter_name], dtype=weight.dtype)
        layer.weight = nn.Parameter(norm.to(lora_A.dtype), requires_grad=True)
        module.lora_magnitude_vector[adapter_name] = layer

    @staticmethod
    def forward(module, active_adapter, x, result, **kwargs):
        raise NotImplementedError("fastft: DoRA on an NF4 base runs only the fused forward (one active adapter, no "
                                  "extra forward arguments); merge it with fastft.merge_and_unload for other uses")


class FusedQDoraLinear(_DoraForward, FusedQLoraLinear):
    """DoRA on a fastft NF4Linear; plain LoRA adapters beside it keep the QLoRA path."""

    @property
    def lora_variants(self):
        return {(): None, ("use_dora",): _NF4DoraVariant}

    def merges_dora(self, adapter_names=None) -> bool:
        """Whether merging `adapter_names` (peft's default: the active adapters) would merge a DoRA adapter."""
        return any(a in self.lora_magnitude_vector for a in (adapter_names or self.active_adapters))

    def merge(self, safe_merge: bool = False, adapter_names=None) -> None:
        if self.merges_dora(adapter_names):
            raise NotImplementedError(NF4_DORA_MERGE)
        super().merge(safe_merge=safe_merge, adapter_names=adapter_names)

    def to_dense(self, dtype: torch.dtype | None = None):
        super().to_dense(dtype)
        for magnitude in self.lora_magnitude_vector.values():  # peft's DoRA merge reads the layout from there too
            magnitude.fan_in_fan_out = self.fan_in_fan_out
        self.__class__ = FusedDoraLinear
        return self


NF4_DORA_MERGE = ("fastft: merging DoRA into an NF4 weight is not supported; fastft.merge_and_unload(model) "
                  "dequantizes first and merges in dense")


def refuse_nf4_dora_merge(model: nn.Module, adapter_names=None) -> None:
    """NotImplementedError before a whole-model merge touches any layer when it would merge DoRA into an NF4 weight:
    peft's merges walk the layers in order, so FusedQDoraLinear.merge's own refusal came after the layers before
    it were merged (their NF4 weights requantized, which unmerge does not undo), or merged and unloaded."""
    if any(isinstance(m, FusedQDoraLinear) and m.merges_dora(adapter_names) for m in model.modules()):
        raise NotImplementedError(NF4_DORA_MERGE)


def fused_class_for(module) -> type:
    """The fastft class for a plain peft LoRA Linear: the DoRA-capable one when it holds a DoRA adapter."""
    return FusedDoraLinear if len(module.lora_magnitude_vector) else FusedLoraLinear


def register_quantized(config: LoraConfig, model: nn.Module) -> LoraConfig:
    """Have peft wrap NF4Linear targets in FusedQDoraLinear, and make the QLoRA layers `model` already holds
    DoRA-capable (a DoRA adapter added beside a LoRA one: peft's own DoRA variant cannot read an NF4 weight)."""
    if any(isinstance(m, NF4Linear) for m in model.modules()):
        config._register_custom_module({NF4Linear: FusedQDoraLinear})
    for module in model.modules():
        if type(module) is FusedQLoraLinear:
            module.__class__ = FusedQDoraLinear
    return config


def get_dora_model(model: nn.Module, config: LoraConfig, adapter_name: str = "default", **kwargs):
    """peft.get_peft_model with LoraConfig(use_dora=True), validated, with fused DoRA layers."""
    from fastft.integration.lora_config import with_quantized_targets
    from fastft.integration.peft_lora import fuse_lora_layers, quiet_peft_model

    validate_dora_config(config, model)
    with_quantized_targets(config, model)  # FusedQDoraLinear on NF4 layers, "all-linear" expanded over them
    return fuse_lora_layers(quiet_peft_model(model, config, adapter_name, **kwargs), "get_peft_model")
