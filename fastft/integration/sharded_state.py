"""State dicts of FSDP2-sharded models (fastft.shard_model): what must be gathered before a save."""
from __future__ import annotations

from torch import nn


def is_sharded(model: nn.Module) -> bool:
    """FSDP2 made some parameters DTensors: a state dict must be gathered (and scattered on load)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def gathered_adapter_state(model: nn.Module) -> dict:
    """The adapter weights of a sharded peft model, whole and on the CPU, under their state-dict keys: every entry
    named after one of the model's adapters (lora_A.default.weight, prompt_encoder.default..., modules_to_save
    copies) or trainable. A collective: every rank calls, in the same key order. The frozen base is not gathered."""
    from torch.distributed.tensor import DTensor

    adapters = list(getattr(model, "peft_config", {}) or {})
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    state = {}
    for key, value in model.state_dict(keep_vars=True).items():
        if key in trainable or any(f".{name}." in f".{key}." for name in adapters):
            whole = value.full_tensor() if isinstance(value, DTensor) else value
            state[key] = whole.detach().cpu()
    return state
