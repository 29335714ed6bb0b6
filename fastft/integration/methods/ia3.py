"""IA3's room: peft's `IA3Config` accepted, a fused IA3 layer, injection through peft.

Config: peft's IA3Config; fields whose forward the fused op does not compute are refused naming the field.
Conv1D layers (GPT-2: peft sets fan_in_fan_out=True for them) run unfused, through peft's forward; creating,
saving and loading follow that one rule.
Layer: `FusedIA3Linear` — peft's IA3 Linear (same state `ia3_l`, same save format) whose forward goes through
`fastft.ops.ia3_linear`: the learned vector folded into the GEMM (input scale as a prologue on x's K-columns
for feed-forward modules, output scale as an epilogue column scale otherwise). Several active adapters
multiply their vectors first, as peft does. Disabled or merged adapters, fan_in_fan_out, non-Linear or hooked
bases take peft's forward; NF4 bases peft's IA3 forward over the NF4 layer (fastft.integration.methods.ia3_nf4).
Injection: peft builds the model; every plain peft IA3 Linear is swapped in place (no state changes).
"""
from __future__ import annotations

import re
import warnings
from typing import Any

import torch
from peft import IA3Config
from peft.tuners.ia3 import Linear as PeftIA3Linear
from torch import nn

from fastft.integration.base_layers import transformers_model
from fastft.integration.methods.ia3_nf4 import nf4_ia3_layers
from fastft.integration.module_names import name_hint, names_module
from fastft.modules.lora import default_backend, plain_linear
from fastft.ops.ia3 import ia3_linear
from fastft.ops.shared import autocast_enabled


def validate_ia3_config(config, model: nn.Module) -> None:
    """ValueError naming the field for an IA3 option that is wrong for `model` (the same when creating and loading:
    fan_in_fan_out=True only with Conv1D targets, which run peft's forward)."""
    from peft.utils import TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING as defaults

    from fastft.integration.lora_config import (check_exclude_modules, check_fan_in_fan_out, check_modules_to_save,
                                                check_modules_to_save_dense, targeted_modules,
                                                warn_unmatched_targets)
    if not isinstance(config, IA3Config):
        raise TypeError(f"validate_ia3_config expects a peft.IA3Config, got {type(config).__name__}")
    targeted = targeted_modules(config, model, defaults)
    if config.fan_in_fan_out:
        check_fan_in_fan_out(config, targeted, "IA3Config.fan_in_fan_out")
    targets, ff = config.target_modules, config.feedforward_modules
    if isinstance(targets, (list, set, tuple)) and isinstance(ff, (list, set, tuple)):
        stray = sorted(set(ff) - set(targets))
        if stray:
            raise ValueError(f"IA3Config.feedforward_modules={sorted(ff)} names modules not in target_modules "
                             f"({sorted(targets)}): {stray}")
    names = [name for name, _ in model.named_modules(remove_duplicate=False) if name]
    warn_unmatched_targets(config, model, names, "IA3Config", "IA3", stacklevel=4)
    check_exclude_modules(config, names, "IA3Config")
    check_modules_to_save(config, names, "IA3Config")
    check_modules_to_save_dense(config, model, "IA3Config")
    if targeted and ff:  # an entry no targeted module matches scales that module's output, not its input
        matched = [n for n, _ in targeted]
        if isinstance(ff, str):  # a regex, matched whole as peft matches it
            unmatched = [] if any(re.fullmatch(ff, n) for n in matched) else [ff]
        else:  # peft's rule: the name ends with the entry (not only at a dot: 'proj' ends 'k_proj' too)
            unmatched = [e for e in ff if not any(n.endswith(e) for n in matched)]
            partial = [e for e in ff if e not in unmatched and not any(names_module(e, n) for n in matched)]
            if partial:
                hits = sorted({n.rsplit(".", 1)[-1] for n in matched if n.endswith(partial[0])})
                warnings.warn(f"IA3Config.feedforward_modules entry {partial[0]!r} is no whole module name, but peft "
                              f"matches it as the end of a name: {hits} scale their input (feed-forward); name the "
                              f"modules whole (e.g. {[hits[0]]}) if that is not meant", UserWarning, stacklevel=4)
        if unmatched and isinstance(ff, str):  # a name given as a string: peft reads it as a regex, matched whole
            raise ValueError(f"IA3Config.feedforward_modules={ff!r} is a string, which peft reads as a regex the whole "
                             f"module name must match, and it matches none of the modules IA3 targets (e.g. "
                             f"{matched[0]!r}); give a list of names (['{ff.rsplit('.', 1)[-1]}']) or a regex of "
                             f"whole names (r'.*\\.{ff.rsplit('.', 1)[-1]}')")
        if unmatched:
            raise ValueError(f"IA3Config.feedforward_modules entries {unmatched} match none of the modules IA3 "
                             f"targets ({sorted({n.rsplit('.', 1)[-1] for n in matched})}); "
                             # a typo only: 'down_proj' is not 'v_proj' mistyped, and an attention layer is no
                             # feed-forward one
                             f"{name_hint(str(unmatched[0]), matched, cutoff=0.85)}")


class FusedIA3Linear(PeftIA3Linear):
    def _scale(self, x) -> torch.Tensor | None:
        base = self.get_base_layer()
        if self.disable_adapters or self.merged or self.fan_in_fan_out or not plain_linear(base, x.device):
            return None
        if x.dtype != base.weight.dtype and not autocast_enabled(x.device.type):
            return None
        names = [a for a in self.active_adapters if a in self.ia3_l]
        if not names:
            return None
        scale = self.ia3_l[names[0]].flatten()
        for name in names[1:]:
            scale = scale * self.ia3_l[name].flatten()
        return scale

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        scale = None if args or kwargs else self._scale(x)
        if scale is None:
            return super().forward(x, *args, **kwargs)
        base = self.get_base_layer()
        return ia3_linear(x, base.weight, base.bias, scale, feedforward=self.is_feedforward,
                          backend=default_backend())


def patch_ia3(model: nn.Module) -> nn.Module:
    found = 0
    for module in model.modules():
        if isinstance(module, PeftIA3Linear):
            found += 1
            if type(module) is PeftIA3Linear:
                module.__class__ = FusedIA3Linear
    if not found:
        raise ValueError(f"patch_ia3: {type(model).__name__} contains no peft IA3 Linear layer")
    return model


def fuse_ia3_layers(model: nn.Module, what: str) -> nn.Module:
    from fastft.integration.peft_lora import fuse_or_warn

    return fuse_or_warn(model, PeftIA3Linear, patch_ia3, what, "IA3")


def get_ia3_model(model: nn.Module, config: IA3Config, adapter_name: str = "default", **kwargs):
    from fastft.integration.peft_lora import quiet_peft_model

    validate_ia3_config(config, model)
    with nf4_ia3_layers():
        return fuse_ia3_layers(quiet_peft_model(model, config, adapter_name, **kwargs), "get_peft_model")


def add_ia3_adapter(model, adapter_name: str, config: IA3Config):
    """`model.add_adapter` for an IA3 adapter on a PeftModel holding IA3 adapters, validated, its layers fused."""
    validate_ia3_config(config, transformers_model(model))
    with nf4_ia3_layers():
        model.add_adapter(adapter_name, config)
    return fuse_ia3_layers(model, "add_adapter")


def load_ia3_adapter(model: nn.Module, path, config: IA3Config, adapter_name: str, is_trainable: bool):
    from pathlib import Path

    from peft import PeftModel
    from peft.tuners.ia3 import IA3Model

    from fastft.integration.adapter_files import check_adapter_tensors
    from fastft.integration.peft_lora import quiet_peft_load

    base = transformers_model(model)
    validate_ia3_config(config, base)

    def vector(name, in_features, out_features):  # peft's IA3 Linear: scales the input, or the output
        return (1, in_features) if IA3Model._check_target_module_feedforward(config, name) else (out_features, 1)

    check_adapter_tensors(base, Path(path), config, {"ia3_l": vector})
    config.inference_mode = not is_trainable
    with nf4_ia3_layers():
        if isinstance(model, PeftModel):
            model.load_adapter(str(path), adapter_name=adapter_name, is_trainable=is_trainable)
            return fuse_ia3_layers(model, "load_adapter")
        return fuse_ia3_layers(quiet_peft_load(model, path, adapter_name=adapter_name, is_trainable=is_trainable,
                                               config=config), "load_adapter")
