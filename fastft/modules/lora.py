"""peft's LoRA Linear with its forward through fastft's fused op.

`FusedLoraLinear` subclasses `peft.tuners.lora.Linear` and adds no state: same attributes, same
submodules (base_layer, lora_A.<name>, lora_B.<name>), same state dict, and peft's own merge/unmerge,
adapter management and saving keep working. Only the hot path changes: instead of peft's base GEMM
plus five full-size passes (dropout, x·Aᵀ, ·Bᵀ, scale, add), one `fastft.ops.lora_linear` call.

Cases the fused op does not cover (a LoRA variant such as DoRA, lora_bias, mixed-adapter batches,
hooked or non-Linear base layers, disabled or merged adapters, several active adapters with dropout: peft draws
one mask per adapter) take peft's forward unchanged.
"""
from __future__ import annotations

import contextlib
import os

import torch
from peft.tuners.lora import Linear as PeftLoraLinear
from torch import nn

from fastft.ops.lora import lora_linear, stacked_adapters
from fastft.ops.shared import (AUTOCAST_CASTS, BACKENDS, autocast_enabled, computes_linear, device_hook_moves_nothing,
                               forward_interceptor, global_module_hooks, replaced_forward, require_triton)


def default_backend() -> str:
    """`FASTFT_LORA_BACKEND` = auto (Triton on CUDA) | triton | torch."""
    backend = os.environ.get("FASTFT_LORA_BACKEND", "auto")
    if backend not in BACKENDS:
        raise ValueError(f"FASTFT_LORA_BACKEND must be one of {BACKENDS}, got {backend!r}")
    if backend == "triton":
        require_triton("FASTFT_LORA_BACKEND=triton", "set it to auto or torch to run without it")
    return backend


def called_as_is(module: nn.Module, device: torch.device) -> bool:
    """Whether the fused ops may read `module`'s weight instead of calling it on `device`: its class's forward runs
    unhooked and the weight is in memory. accelerate's hooks (device_map offload, cpu_offload) replace `forward` on
    the instance (`_hf_hook`) and keep the weight on the meta device until that forward loads it: such a layer must
    be called (a device_map hook that would move nothing does not count, see device_hook_moves_nothing)."""
    return forward_interceptor(module, device) is None and module.weight is not None and not module.weight.is_meta


def adapters_called_as_is(names, *module_dicts, device: torch.device) -> bool:
    """Whether the fused op, run on `device`, may stand in for the adapter submodules peft would call (lora_A,
    lora_B, lora_dropout of each active adapter): none is hooked (forward_interceptor's checks, written out: this
    runs at every forward of every layer, ~1 µs for three modules on a slow host)."""
    if global_module_hooks():
        return False
    for d in module_dicts:
        modules = d._modules
        for name in names:
            m = modules[name]
            own = m.__dict__
            if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks:
                return False
            if "_hf_hook" in own:
                if not device_hook_moves_nothing(m, device):
                    return False
            elif "forward" in own and replaced_forward(m):
                return False
    return True


def plain_linear(module: nn.Module, device: torch.device) -> bool:
    """A plain nn.Linear (nn.Linear's forward or one computing the same, see computes_linear; called as is, see
    called_as_is): the fused ops may stand in for its forward on device."""
    return computes_linear(module) and called_as_is(module, device)


class FusedLoraBase(PeftLoraLinear):
    """The base of the fused LoRA linears (dense, NF4): the forward that hands the active adapters to one fused op;
    subclasses say which op and base."""

    def _base_ok(self, x: torch.Tensor) -> bool:
        raise NotImplementedError

    def _fused(self, x, lora_A, lora_B, scaling, dropout_p):
        raise NotImplementedError

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        operands = self._adapter_operands(x, args, kwargs)
        if operands is None:
            return super().forward(x, *args, **kwargs)
        return self._fused(x, *operands)

    def _adapter_operands(self, x, args, kwargs):
        """(A, B, scaling, dropout_p) for the fused op, or None where peft's forward must run. (Runs on every
        forward: submodule dicts are read once into locals, nn.Module attribute lookups cost host time.)"""
        if args or (kwargs and any(v is not None for v in kwargs.values())):
            return None
        if self.disable_adapters or self.merged or self.fan_in_fan_out or not self._base_ok(x):
            return None
        lora_A, lora_B, lora_dropout = self.lora_A, self.lora_B, self.lora_dropout
        names = [a for a in self.active_adapters if a in lora_A]
        if not names:
            return None
        dropouts = set()
        for name in names:
            if name in self.lora_variant or self.lora_bias.get(name, False):
                return None
            dropout = lora_dropout[name]
            if isinstance(dropout, nn.Identity):
                dropouts.add(0.0)
            elif type(dropout) is nn.Dropout:
                dropouts.add(dropout.p if dropout.training else 0.0)
            else:
                return None
        if not adapters_called_as_is(names, lora_A, lora_B, lora_dropout, device=x.device):
            return None  # peft calls them: their hooks run
        if len(names) == 1:
            name = names[0]
            scaling = self.scaling[name]
            if isinstance(scaling, torch.Tensor):
                # peft's prepare_model_for_compiled_hotswap / scale_layer(tensor): peft's forward keeps it a tensor
                # (float() would sync, and torch.compile would specialise on its value)
                return None
            return lora_A[name].weight, lora_B[name].weight, scaling, dropouts.pop()
        if dropouts != {0.0}:
            return None  # peft draws each active adapter's dropout mask on its own; the fused op draws one
        return (*stacked_adapters(lora_A, lora_B, self.scaling, names), 0.0)


class FusedLoraLinear(FusedLoraBase):
    """LoRA on a plain nn.Linear through fastft.ops.lora_linear."""

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        with self._all_or_nothing():
            super().merge(safe_merge=safe_merge, adapter_names=adapter_names)

    def unmerge(self) -> None:
        with self._all_or_nothing():
            super().unmerge()

    @contextlib.contextmanager
    def _all_or_nothing(self):
        """peft's merge adds ΔW to the weight, then records the adapter as merged, and its unmerge drops the record,
        then subtracts ΔW: interrupted between the two (Ctrl-C lands right after the long add), the next merge added
        ΔW again, silently. The weight and bias change in copies here, and an exception puts them and the record
        back as they were (one layer's weight held twice for the moment)."""
        base = self.get_base_layer()
        weight, bias = base.weight.data, (base.bias.data if getattr(base, "bias", None) is not None else None)
        merged = list(self.merged_adapters)
        try:
            base.weight.data = weight.clone()
            if bias is not None:
                base.bias.data = bias.clone()
            yield
        except BaseException:
            base.weight.data = weight
            if bias is not None:
                base.bias.data = bias
            self.merged_adapters[:] = merged
            raise

    def _base_ok(self, x):
        base = self.base_layer
        if not plain_linear(base, x.device):
            return False
        w_dtype = base.weight.dtype
        # under autocast the op casts both as torch's own linear would: fp64 is never cast, so a mixed pair stays
        # mixed and takes peft's forward (torch's own error), as without autocast
        return x.dtype == w_dtype or (autocast_enabled(x.device.type) and x.dtype in AUTOCAST_CASTS
                                      and w_dtype in AUTOCAST_CASTS)

    def _fused(self, x, lora_A, lora_B, scaling, dropout_p):
        base = self.base_layer
        return lora_linear(x, base.weight, base.bias, lora_A, lora_B, scaling, dropout_p, backend=default_backend())
