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


def write_on_rank0(write, what: str):
    """Run `write()` on rank 0 only and return its result there (None elsewhere); every rank returns once it is done.
    A failure is shared (one small broadcast): rank 0 raises its own error and the other ranks an error naming it,
    instead of waiting in a barrier until the process group's timeout. A collective: every rank calls."""
    import torch.distributed as dist

    result, error = None, None
    if dist.get_rank() == 0:
        try:
            result = write()
        except Exception as e:  # shared below, then raised again on rank 0
            error = e
    outcome = [None if error is None else f"{type(error).__name__}: {error}"]
    dist.broadcast_object_list(outcome, src=0)
    if error is not None:
        raise error
    if outcome[0] is not None:
        raise RuntimeError(f"{what}: rank 0, which writes, failed ({outcome[0]}); nothing was written")
    return result
