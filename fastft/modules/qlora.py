"""QLoRA: peft's LoRA Linear around a fastft NF4Linear base, forward through fastft.ops.qlora_linear.

Built by peft itself (fastft.get_peft_model registers this class for NF4Linear targets), so adapters,
saving and peft's methods work as for plain LoRA. Merging into a 4-bit weight re-quantizes it: merge
dequantizes W, adds the adapters' deltas in fp32 and quantizes the sum again with the same blocksize and
double quantization (lossy; unmerge cannot restore the original codes exactly), with a warning as peft gives for
bitsandbytes 4-bit layers. fastft.merge_and_unload(model) instead returns dense layers by default (no second rounding).
"""
from __future__ import annotations

import contextlib
import warnings

import torch
from peft.tuners.tuners_utils import check_adapters_to_merge

from fastft.modules.lora import FusedLoraBase, called_as_is, default_backend
from fastft.modules.nf4_linear import NF4Linear
from fastft.ops.qlora import qlora_linear
from fastft.ops.shared import in_compute_dtype
from fastft.quant.nf4_weight import quantize_nf4


class NF4RoundingWarning(UserWarning):
    """A merge into (or unmerge from) an NF4 weight re-quantized it: outputs differ from the unmerged model's."""


# peft's wording for bitsandbytes 4-bit layers (peft/tuners/lora/bnb.py), plus the exact alternative. One fixed text
# from one line: Python's default filter shows it once, not once per layer.
_EXACT = "fastft.merge_and_unload(model) merges into dense weights exactly"
_MERGE_WARNING = (f"Merge lora module to 4-bit linear may get different generations due to rounding errors (the NF4 "
                  f"weight is re-quantized with the adapters' update added; {_EXACT}).")
_UNMERGE_WARNING = (f"Unmerge lora module to 4-bit linear may get different generations due to rounding errors (the "
                    f"NF4 weight is re-quantized with the update subtracted, which does not restore the base weight "
                    f"exactly; {_EXACT}, leaving no NF4 merge to undo).")


class FusedQLoraLinear(FusedLoraBase):
    # An NF4 weight is always stored (out, in) (an NF4Linear holds a Conv1D's weight transposed), so fan_in_fan_out
    # is always False here. peft sets it from the config: True for a GPT-2 adapter, and peft turns the shared config
    # True itself when it meets a dense Conv1D target earlier in the same model (quantize_model(skip=...)); taken
    # as-is it would merge ΔWᵀ and decline the fused forward (QDoRA: no forward at all).
    @property
    def fan_in_fan_out(self) -> bool:
        return False

    @fan_in_fan_out.setter
    def fan_in_fan_out(self, value) -> None:
        pass  # peft's __init__ copies config.fan_in_fan_out; it never describes an NF4 weight

    def _get_in_out_features(self, module):
        return module.in_features, module.out_features

    def _base_ok(self, x):
        base = self.base_layer
        return type(base) is NF4Linear and called_as_is(base, x.device)

    def _fused(self, x, lora_A, lora_B, scaling, dropout_p):
        base = self.base_layer
        return in_compute_dtype(qlora_linear, x, base.weight, base.bias, lora_A, lora_B, scaling, dropout_p,
                                backend=default_backend())

    def _requantize_with(self, adapters: list[str], sign: float, safe: bool = False) -> None:
        base = self.get_base_layer()
        w = base.weight.dequantize(torch.float32)
        for name in adapters:
            w += sign * self.get_delta_weight(name).to(device=w.device, dtype=torch.float32)
        if safe and not torch.isfinite(w).all():
            raise ValueError(f"NaNs detected in the merged weights of adapters {adapters}")
        base.weight = quantize_nf4(w.to(base.weight.dtype), blocksize=base.weight.blocksize,
                                   double_quant=base.weight.double_quant, name=f"weight merged with adapters {adapters}")

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        adapters = [a for a in check_adapters_to_merge(self, adapter_names) if a in self.lora_A]
        if adapters:
            warnings.warn(_MERGE_WARNING, NF4RoundingWarning)
            with self._all_or_nothing():  # the weight and its record change together
                self._requantize_with(adapters, +1.0, safe=safe_merge)
                self.merged_adapters.extend(adapters)

    def unmerge(self) -> None:
        adapters = [a for a in self.merged_adapters if a in self.lora_A]
        with self._all_or_nothing():
            if adapters:
                warnings.warn(_UNMERGE_WARNING, NF4RoundingWarning)
                self._requantize_with(adapters, -1.0)
            self.merged_adapters = []

    @contextlib.contextmanager
    def _all_or_nothing(self):
        """The NF4 weight (replaced whole by a requantized one) and the merge record as they were if the block fails
        or is interrupted (Ctrl-C between the two merged ΔW twice at the next merge, silently)."""
        base = self.get_base_layer()
        weight, merged = base.weight, list(self.merged_adapters)
        try:
            yield
        except BaseException:
            base.weight = weight
            self.merged_adapters = merged
            raise

    def to_dense(self, dtype: torch.dtype | None = None):
        """This layer with its base dequantized into an nn.Linear in `dtype` (None: the NF4 weight's; merge_and_unload
        passes the model's): plain LoRA, same adapters. A Conv1D base (GPT-2) comes back as a Conv1D and peft merges
        into it transposed (fan_in_fan_out)."""
        from fastft.modules.lora import FusedLoraLinear

        base, cls = self.get_base_layer(), type(self)
        dense = base.to_linear(dtype)
        try:  # all three or none: a layer left between them could neither run nor be merged again
            self.base_layer = dense
            self.__class__ = FusedLoraLinear  # first: this class's fan_in_fan_out is always False
            self.fan_in_fan_out = base.from_conv1d  # peft's rule for a Conv1D base: ΔW is added transposed
        except BaseException:
            self.__class__ = cls
            self.base_layer = base
            raise
        return self
