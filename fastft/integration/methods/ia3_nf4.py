"""IA3 on fastft's NF4 layers (peft + bitsandbytes run IA3 on 4-bit layers; peft's IA3 knows only its dense types).

`NF4IA3Linear` is peft's IA3 Linear (same state `ia3_l`, same save format, peft's forward: the vector scales the
NF4 layer's input for feed-forward modules, its output otherwise) over an `NF4Linear` base. peft builds it through
`nf4_ia3_layers()`, which only adds NF4Linear to the base types peft's IA3 injection accepts.
Merging: folding l into the weight would quantize W ⊙ l again (a second NF4 rounding, and unmerge divides it
out approximately), so merge/merge_adapter are refused; `fastft.merge_and_unload` dequantizes the base first
(`to_dense`) and merges in dense, exactly.
"""
from __future__ import annotations

import contextlib
import threading

import torch
from peft.tuners.ia3 import IA3Model
from peft.tuners.ia3 import Linear as PeftIA3Linear
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from fastft.modules.nf4_linear import NF4Linear

NF4_IA3_MERGE = ("fastft: merging IA3 into an NF4 weight is not supported (it would quantize W ⊙ l again); "
                 "fastft.merge_and_unload(model) (without requantize=True) dequantizes first and merges in dense")


class NF4IA3Linear(PeftIA3Linear):
    def __init__(self, base_layer: nn.Module, adapter_name: str, config, is_feedforward: bool = False, **kwargs):
        nn.Module.__init__(self)
        # IA3Layer.__init__'s state, without its check that the base is a dense torch / transformers type
        self.base_layer = base_layer
        self.ia3_l = nn.ParameterDict({})
        self._disable_adapters = False
        self.merged_adapters = []
        self.is_feedforward = is_feedforward
        nf4 = self.get_base_layer()
        self.in_features, self.out_features = nf4.in_features, nf4.out_features
        self.fan_in_fan_out = False  # the NF4 layer computes x·Wᵀ whatever layout its dense source had
        self.is_target_conv_1d_layer = False
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config=config)

    def merge(self, safe_merge: bool = False, adapter_names=None) -> None:
        if any(a in self.ia3_l for a in (adapter_names or self.active_adapters)):
            raise NotImplementedError(NF4_IA3_MERGE)

    def to_dense(self, dtype: torch.dtype | None = None):
        """This layer with its base dequantized (an nn.Linear, or the Conv1D it was quantized from) in `dtype`:
        peft's dense IA3 Linear, same vectors, which peft's merge folds in exactly."""
        base = self.get_base_layer()
        self.base_layer = base.to_linear(dtype)
        self.__class__ = PeftIA3Linear
        self.fan_in_fan_out = self.is_target_conv_1d_layer = base.from_conv1d  # peft's rule for a Conv1D base
        return self


def holds_nf4_ia3(model: nn.Module, adapter_names=None) -> bool:
    """Whether merging `adapter_names` (peft's default: the active adapters) would merge IA3 into an NF4 weight."""
    return any(isinstance(m, NF4IA3Linear) and any(a in m.ia3_l for a in (adapter_names or m.active_adapters))
               for m in model.modules())


def refuse_nf4_ia3_merge(model: nn.Module, adapter_names=None) -> None:
    """NotImplementedError before a whole-model merge changes any layer (peft walks the layers in order: the dense
    ones before the first NF4 one would be merged already)."""
    if holds_nf4_ia3(model, adapter_names):
        raise NotImplementedError(NF4_IA3_MERGE)


_LOCK = threading.RLock()


@contextlib.contextmanager
def nf4_ia3_layers():
    """Inside the block peft's IA3 injection (get_peft_model, add_adapter, load_adapter) builds an NF4IA3Linear for
    a targeted NF4Linear; other layers as peft builds them."""
    with _LOCK:  # read inside: a thread reading it outside could take another's patch for peft's and restore that
        original = IA3Model.__dict__["_create_new_module"]

        def create(ia3_config, adapter_name, target, **kwargs):
            base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
            if isinstance(base, NF4Linear):
                return NF4IA3Linear(target, adapter_name, ia3_config,
                                    is_feedforward=kwargs.get("is_feedforward", False))
            return original.__func__(ia3_config, adapter_name, target, **kwargs)

        IA3Model._create_new_module = staticmethod(create)
        try:
            yield
        finally:
            IA3Model._create_new_module = original
