"""`NF4Linear`: a frozen linear layer whose weight is an NF4Weight (bitsandbytes' NF4 layout).

`.weight` is the quantized weight itself (fastft.quant.NF4Weight, a tensor subclass: `.dequantize()`, `.shape`,
`.dtype`, ...) registered as a frozen Parameter, so `model.parameters()`, `module.to(device)`, peft and FSDP2
see it; assigning an NF4Weight to `.weight` registers it the same way (a dense tensor is refused). `.bias` is an
ordinary Parameter. The state dict uses bitsandbytes' keys, so `load_state_dict` takes a transformers +
bitsandbytes 4-bit checkpoint directly — or a dense float weight, which it quantizes (a Conv1D's as that
checkpoint stores it, (in, out)), or an NF4Weight (FSDP2's
sharded state dict). Loads copy into the current weight in place, as torch loads a parameter (a checkpoint of
another blocksize or double quantization replaces it instead; `assign=True` always does); an FSDP2-sharded layer
copies its rank's rows of a whole weight (bitsandbytes' keys, dense or an NF4Weight) into its shard.
A LoRA wrapper calls `fastft.ops.qlora_linear(x, layer.weight, layer.bias, A, B, scaling, dropout_p)`.
transformers' Conv1D (GPT-2: y = x·W + b, W stored (in, out)) becomes an NF4Linear holding Wᵀ, as bitsandbytes
converts it; `to_linear` gives a Conv1D back, so a merged GPT-2 saves in its own layout.
"""
from __future__ import annotations

import functools

import torch
from torch import nn

from fastft.arguments import check_flag
from fastft.ops.qlora import nf4_linear
from fastft.ops.shared import in_compute_dtype
from fastft.quant.nf4_format import check_blocksize
from fastft.quant.nf4_tensor_ops import layout
from fastft.quant.nf4_weight import NF4Weight, local_nf4, quantize_nf4


class NF4Linear(nn.Module):
    """y = x·Wᵀ + b with W stored as NF4 (frozen); computes in x's dtype, but an fp32 x on a bf16 NF4 weight in bf16
    (fastft.ops.shared.compute_input, as bitsandbytes' compute dtype), returning fp32.

    Built empty (weight None, e.g. before loading a checkpoint) or with `weight=`; `from_linear` quantizes an
    nn.Linear. blocksize / double_quant are used when a dense weight is quantized into this layer.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, weight: NF4Weight | None = None,
                 blocksize: int = 64, double_quant: bool = True, device=None, dtype=None):
        super().__init__()
        for name, size in (("in_features", in_features), ("out_features", out_features)):
            if not (isinstance(size, int) and not isinstance(size, bool) and size >= 0):
                raise ValueError(f"NF4Linear: `{name}` must be a non-negative int, got {size!r}")
        check_flag(double_quant, "NF4Linear", "double_quant")
        self.in_features = in_features
        self.out_features = out_features
        self.blocksize = check_blocksize(blocksize, "NF4Linear")
        self.double_quant = double_quant
        self.from_conv1d = False  # True: stands for a transformers Conv1D (to_linear gives one back)
        self.register_parameter("weight", None)
        if weight is not None:
            self.weight = weight
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype))
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_linear(cls, linear: nn.Module, blocksize: int = 64, double_quant: bool = True, *,
                    name: str | None = None) -> NF4Linear:
        """Quantize an nn.Linear or a transformers Conv1D (its bias is kept as is, same tensor). name: the
        layer's, for errors."""
        if not (isinstance(linear, nn.Linear) or is_conv1d(linear)):
            raise TypeError(f"NF4Linear.from_linear: `linear` must be an nn.Linear or a transformers Conv1D, got "
                            f"{type(linear).__name__}")
        in_features, out_features = linear_features(linear)
        weight = quantize_nf4(dense_weight(linear, linear.weight.detach()), blocksize=blocksize,
                              double_quant=double_quant, name=f"{name}.weight" if name else None)
        layer = cls(in_features, out_features, bias=False, weight=weight, blocksize=blocksize,
                    double_quant=double_quant)
        layer.bias = linear.bias
        layer.from_conv1d = is_conv1d(linear)
        return layer

    def __setattr__(self, name, value):
        if name == "weight" and value is not None:
            self._check_weight(value)
            if not isinstance(value, nn.Parameter):
                value = nn.Parameter(value, requires_grad=False)  # frozen: the codes have no gradient
        super().__setattr__(name, value)

    def register_parameter(self, name, param) -> None:
        if name == "weight" and param is not None:
            # set directly: accelerate's init_empty_weights patches nn.Module.register_parameter to rebuild each
            # parameter as `type(p)(p.to("meta"), **p.__dict__)`, which a tensor subclass cannot take
            self._parameters[name] = param
            return
        super().register_parameter(name, param)

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
        return in_compute_dtype(nf4_linear, x, self.weight, self.bias)

    def dequantize_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return self.weight.dequantize(dtype)

    def to_linear(self, dtype: torch.dtype | None = None) -> nn.Module:
        """A dense nn.Linear with the dequantized weight (e.g. to merge an adapter into); a transformers Conv1D
        (weight (in, out)) when the layer was one. dtype None: the weight's own dtype."""
        w = self.weight.dequantize(dtype)
        if self.from_conv1d:
            from transformers.pytorch_utils import Conv1D

            linear, w = Conv1D(self.out_features, self.in_features).to(device=w.device, dtype=w.dtype), w.t()
            if self.bias is None:  # Conv1D always adds one
                nn.init.zeros_(linear.bias)
        else:
            linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device=w.device,
                               dtype=w.dtype)
        with torch.no_grad():
            linear.weight.copy_(w)
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        # frozen as this layer was (a QLoRA merge's dense layers are not trainable parameters all of a sudden)
        linear.weight.requires_grad_(self.weight.requires_grad)
        if linear.bias is not None:
            linear.bias.requires_grad_((self.bias if self.bias is not None else self.weight).requires_grad)
        return linear

    # Moves need no code here: `module.to(device)` moves the weight's codes and scales (NF4Weight.to), and dtype
    # casts (`.half()`, `.to(torch.bfloat16)`) leave its codes and dtype alone (nf4_tensor_ops.cast_dtype; only the
    # bias follows).
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
        incoming, from_checkpoint = self._read_weight(state_dict, key, device)
        if incoming is not None:
            self._load_weight(current, incoming, key, device, from_checkpoint,
                              local_metadata.get("assign_to_params_buffers", False), error_msgs)
        elif strict:
            missing_keys.append(key)
        # torch loads the rest (the bias), without the weight (handled above) and the hooks (run above)
        current, self._parameters["weight"] = self._parameters["weight"], None
        self._load_state_dict_pre_hooks = {}
        try:
            super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                          error_msgs)
        finally:
            self._parameters["weight"], self._load_state_dict_pre_hooks = current, hooks

    def _read_weight(self, state_dict, key, device):
        """Pop the weight under `key`: (an NF4Weight, FSDP2's DTensor of one, or None when absent; from_checkpoint:
        True when it came as bitsandbytes' keys or as a dense weight, quantized here)."""
        value = state_dict.get(key)
        if getattr(value, "_local_tensor", None) is not None and local_nf4(value) is None:
            # DCP's full-state-dict load hands the packed codes or a dense weight cut into this rank's rows: the
            # whole tensor back (every rank loads the same keys in the same order, so each joins this all-gather)
            value = state_dict[key] = value.full_tensor()
        if NF4Weight.has_bnb_state(state_dict, key):
            weight = NF4Weight.from_bnb_state_dict(state_dict, key, device=device)
            for k in [k for k in state_dict if k == key or k.startswith(key + ".")]:
                del state_dict[k]
            return weight, True
        if value is None:
            return None, False
        del state_dict[key]
        if local_nf4(value) is not None:  # an NF4Weight itself, or FSDP2's DTensor of one
            return value, False
        dense = value if device is None else value.to(device)  # a dense checkpoint: quantize on load
        if self.from_conv1d and dense.dim() == 2:  # the Conv1D's own (in, out) layout, as its checkpoints store it
            dense = dense.t().contiguous()
        return quantize_nf4(dense, blocksize=self.blocksize, double_quant=self.double_quant, name=key), True

    def _load_weight(self, current, incoming, key, device, from_checkpoint, assign, error_msgs) -> None:
        """Copy `incoming` into the current weight in place, as torch loads a parameter (its Parameter, device and
        dtype kept; under FSDP2 its shard), or take it as the weight (assign=True, no current weight, or a checkpoint
        of another layout: its blocksize and double quantization are the checkpoint's). A layout mismatch with an
        NF4Weight, or with anything loaded into an FSDP2 shard (FSDP2 keeps its parameter), goes to error_msgs."""
        if tuple(incoming.shape) != (self.out_features, self.in_features):  # as torch reports it, not raised mid-load
            layout_note = " (a dense weight in the Conv1D's (in, out) layout, transposed here)" \
                if self.from_conv1d else ""
            error_msgs.append(f"size mismatch for {key}: the checkpoint's weight is {tuple(incoming.shape)} as "
                              f"(out_features, in_features){layout_note}, the layer's ({self.out_features}, "
                              f"{self.in_features})")
            return
        sharded = current is not None and not isinstance(current, NF4Weight)  # FSDP2's DTensor of an NF4Weight
        whole_into_shard = sharded and isinstance(incoming, NF4Weight)
        rebind = current is None or current.is_meta or (assign and not whole_into_shard) or (
            from_checkpoint and not sharded and layout(current) != layout(incoming))
        if rebind:
            self.weight = incoming if device is None or incoming.device == device else incoming.to(device)
            return
        try:
            with torch.no_grad():
                if whole_into_shard:
                    _copy_rows_into_shard(current, incoming)
                else:
                    current.copy_(incoming)
        except (ValueError, RuntimeError, NotImplementedError) as e:
            where = "this rank's shard of the layer" if sharded else "the layer"
            error_msgs.append(f"While copying the NF4 weight '{key}' into {where}: {e}")

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"weight={self.weight!r}")


@functools.lru_cache(maxsize=1)
def _conv1d_class():
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # transformers is optional for the layer itself
        return None
    return Conv1D


def is_conv1d(module: nn.Module) -> bool:
    """transformers' Conv1D (GPT-2's linears: y = x·W + b with W stored (in, out))."""
    conv1d = _conv1d_class()
    return conv1d is not None and isinstance(module, conv1d)


def linear_features(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of an nn.Linear or a Conv1D (works on meta modules)."""
    if is_conv1d(module):
        return tuple(module.weight.shape)
    return module.in_features, module.out_features


def dense_weight(module: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """`weight` (the module's, or its checkpoint tensor) as (out, in): a Conv1D's is transposed, as bitsandbytes
    stores it."""
    return weight.t().contiguous() if is_conv1d(module) else weight


def _copy_rows_into_shard(shard, full: NF4Weight) -> None:
    """This rank's rows of the whole weight `full` into FSDP2's DTensor `shard` of an NF4Weight, in place."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    if tuple(full.shape) != tuple(shard.shape):
        raise ValueError(f"the checkpoint's weight has shape {tuple(full.shape)}, the layer's {tuple(shard.shape)}")
    size, start = compute_local_shape_and_global_offset(full.shape, shard.device_mesh, shard.placements)
    if tuple(size[1:]) != tuple(full.shape[1:]):
        raise ValueError(f"NF4 weights shard by rows only, got placements {shard.placements}")
    shard._local_tensor.copy_(full[start[0]: start[0] + size[0]])
