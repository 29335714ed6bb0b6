"""The bottleneck adapter layer and the wrapper that puts it after a sublayer's output projection."""
from __future__ import annotations

import torch
from torch import nn

from fastft.modules.lora import called_as_is, default_backend
from fastft.ops.bottleneck_adapter import activation_fn, bottleneck_adapter


class BottleneckAdapter(nn.Module):
    """h + up(act(down(h))), forward through fastft.ops.bottleneck_adapter (fused on CUDA). Parameters are kept
    in `dtype` (fp32 masters by default) and cast to h's dtype inside the op."""

    def __init__(self, features: int, size: int, activation: str, init_std: float, *, device=None,
                 dtype=torch.float32):
        super().__init__()
        self.activation = activation
        self.down = nn.Linear(features, size, device=device, dtype=dtype)
        self.up = nn.Linear(size, features, device=device, dtype=dtype)
        with torch.no_grad():
            self.down.weight.normal_(0.0, init_std)
            self.down.bias.zero_()
            self.up.weight.zero_()  # near identity: the adapter adds nothing until it trains
            self.up.bias.zero_()

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        down, up = self.down, self.up
        if not (called_as_is(down, h.device) and called_as_is(up, h.device)):
            # hooked (a user's, accelerate's offload: weights on meta until the hook loads them): called, in the
            # weights' dtype, so that what intercepts them runs
            z = activation_fn(self.activation)(down(h.to(down.weight.dtype)))
            return h + up(z).to(h.dtype)
        return bottleneck_adapter(h, down.weight, down.bias, up.weight, up.bias, self.activation,
                                  backend=default_backend())

    def extra_repr(self) -> str:
        return f"activation={self.activation!r}"


class AdapterAfter(nn.Module):
    """`base_layer` (a sublayer's output projection), then the adapter on its output (skipped while
    `disabled`: BottleneckAdapterModel.disable_adapter, e.g. DPO's adapter-free reference)."""

    def __init__(self, base_layer: nn.Module, adapter: BottleneckAdapter):
        super().__init__()
        self.base_layer = base_layer
        self.adapter = adapter
        self.disabled = False

    def forward(self, x, *args, **kwargs):
        out = self.base_layer(x, *args, **kwargs)
        return out if self.disabled else self.adapter(out)

    def get_base_layer(self) -> nn.Module:
        return self.base_layer

    # The wrapped layer's tensors, as peft's tuner layers expose them: transformers reads some layers' weight from
    # outside (T5's MLP casts its input to `wo.weight.dtype`; GPT-2's init touches `c_proj.weight`).
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias
