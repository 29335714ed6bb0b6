"""`NF4Linear`: a frozen linear layer whose weight is an NF4Weight (bitsandbytes' NF4 layout).

`.weight` is the quantized weight itself (fastft.quant.NF4Weight, a tensor subclass: `.dequantize()`, `.shape`,
`.dtype`, ...) registered as a frozen Parameter, so `model.parameters()`, `module.to(device)`, peft and FSDP2
see it; assigning an NF4Weight to `.weight` registers it the same way (a dense tensor is refused). `.bias` is an
ordinary Parameter. The state dict uses bitsandbytes' keys, so `load_state_dict` takes a transformers +
bitsandbytes 4-bit checkpoint directly — or a dense float weight, which it quantizes, or an NF4Weight (FSDP2's
sharded state dict), which it copies into the weight in place.
A LoRA wrapper calls `fastft.ops.qlora_linear(x, layer.weight, layer.bias, A, B, scaling, dropout_p)`.
"""
from __future__ import annotations

import torch
from torch import nn

from fastft.ops.qlora import nf4_linear
from fastft.quant.nf4_format import check_blocksize
from fastft.quant.nf4_weight import NF4Weight, local_nf4, quantize_nf4


class NF4Linear(nn.Module):
    """y = x·Wᵀ + b with W stored as NF4 (frozen); computes in x's dtype.

    Built empty (weight None, e.g. before loading a checkpoint) or with `weight=`; `from_linear` quantizes an
    nn.Linear. blocksize / double_quant are used when a dense weight is quantized into this layer.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, weight: NF4Weight | None = None,
                 blocksize: int = 64, double_quant: bool = True, device=None, dtype=None):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.blocksize = check_blocksize(blocksize, "NF4Linear")
        self.double_quant = double_quant
        self.register_parameter("weight", None)
        if weight is not None:
            self.weight = weight
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype))
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, blocksize: int = 64, double_quant: bool = True, *,
                    name: str | None = None) -> NF4Linear:
        """Quantize an nn.Linear (its bias is kept as is, same tensor). name: the layer's, for errors."""
        weight = quantize_nf4(linear.weight.detach(), blocksize=blocksize, double_quant=double_quant,
                              name=f"{name}.weight" if name else None)
        layer = cls(linear.in_features, linear.out_features, bias=False, weight=weight, blocksize=blocksize,
                    double_quant=double_quant)
        layer.bias = linear.bias
        return layer

    def __setattr__(self, name, value):
        if name == "weight" and value is not None:
            self._check_weight(value)
            if not isinstance(value, nn.Parameter):
                value = nn.Parameter(value, requires_grad=False)  # frozen: the codes have no gradient
        super().__setattr__(name, value)

    def _check_weight(self, weight) -> None:
        # A dense tensor here (e.g. `model.tie_weights()` tying a quantized lm_head to the embedding) would only
        # fail later, in the forward; FSDP2 assigns its sharded DTensor of the NF4Weight, which is fine.
        if local_nf4(weight) is None:
            raise TypeError(f"NF4Linear: `weight` must be an NF4Weight (or FSDP2's DTensor of one), got "
                            f"{type(weight).__name__} of {getattr(weight, 'dtype', None)}: quantize it with "
                            "fastft.quant.quantize_nf4, or keep this layer dense (a quantized layer cannot share a "
                            "dense weight, e.g. a tied lm_head; leave it out of quantization)")
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(f"NF4Linear: weight has shape {tuple(weight.shape)} but the layer is "
                             f"({self.out_features}, {self.in_features}) (out_features, in_features)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight is None:
            raise RuntimeError("NF4Linear: the layer has no weight yet (load a state dict or pass weight=)")
        return nf4_linear(x, self.weight, self.bias)

    def dequantize_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return self.weight.dequantize(dtype)

    def to_linear(self, dtype: torch.dtype | None = None) -> nn.Linear:
        """A dense nn.Linear with the dequantized weight (e.g. to merge an adapter into)."""
        w = self.weight.dequantize(dtype)
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device=w.device,
                           dtype=w.dtype)
        with torch.no_grad():
            linear.weight.copy_(w)
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    # Moves need no code here: `module.to(device)` moves the weight's codes and scales (NF4Weight.to), and dtype
    # casts (`.half()`, `.to(torch.bfloat16)`) leave them alone (the weight is quantized; only bias follows).
    # The state dict uses bitsandbytes' keys instead of the weight tensor itself.

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if isinstance(self.weight, NF4Weight):  # under FSDP2 it is a sharded DTensor: kept as the tensor itself
            del destination[prefix + "weight"]
            destination.update(self.weight.bnb_state_dict(prefix + "weight"))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # torch runs the pre-hooks before it loads anything; so must the weight below: FSDP2's hook re-registers
        # the sharded weight (a layer left unsharded after a forward) that the load has to write into
        hooks = self._load_state_dict_pre_hooks
        for hook in hooks.values():
            hook(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        key = prefix + "weight"
        current = self._parameters["weight"]
        # a new weight goes where the layer is (its weight, else its bias), else where the checkpoint is
        device = next((t.device for t in (current, self.bias) if t is not None and t.device.type != "meta"), None)
        weight = None
        if NF4Weight.has_bnb_state(state_dict, key):
            weight = NF4Weight.from_bnb_state_dict(state_dict, key, device=device)
            for k in [k for k in state_dict if k == key or k.startswith(key + ".")]:
                del state_dict[k]
        elif local_nf4(state_dict.get(key)) is not None:  # an NF4Weight itself, or FSDP2's DTensor of one
            incoming = state_dict.pop(key)
            if current is None or current.is_meta or local_metadata.get("assign_to_params_buffers", False):
                weight = incoming if device is None else incoming.to(device)
            else:  # in place, as torch loads a parameter: keeps its device, its Parameter and any FSDP2 sharding
                try:
                    with torch.no_grad():
                        current.copy_(incoming)
                except (ValueError, RuntimeError, NotImplementedError) as e:
                    error_msgs.append(f"While copying the NF4 weight '{key}' into the layer: {e}")
        elif key in state_dict:  # a dense checkpoint: quantize on load
            dense = state_dict.pop(key)
            dense = dense if device is None else dense.to(device)
            weight = quantize_nf4(dense, blocksize=self.blocksize, double_quant=self.double_quant, name=key)
        elif strict:
            missing_keys.append(key)
        if weight is not None:
            self.weight = weight
        # torch loads the rest (the bias), without the weight (handled above) and the hooks (run above)
        current, self._parameters["weight"] = self._parameters["weight"], None
        self._load_state_dict_pre_hooks = {}
        try:
            super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                          error_msgs)
        finally:
            self._parameters["weight"], self._load_state_dict_pre_hooks = current, hooks

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"weight={self.weight!r}")
