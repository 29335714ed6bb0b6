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


def run_shared(work, runs_here: bool, what: str):
    """`work()` where `runs_here`, then every rank learns whether any rank failed, instead of the others waiting in
    their next barrier until the process group's timeout: a failed rank raises its own error, the others an error
    naming it (an OSError where the failure was one, so callers that handle a full disk handle it alike on every
    rank). Returns work's result where it ran (None elsewhere). A collective where a process group runs with more
    than one rank (every rank calls); else simply `work()`'s outcome."""
    import torch.distributed as dist

    result, error = None, None
    try:
        if runs_here:
            result = work()
    except Exception as e:  # shared below, then raised again here
        error = e
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        if error is not None:
            raise error
        return result
    mine = None if error is None else (isinstance(error, OSError), f"{type(error).__name__}: {error}")
    outcomes = [None] * dist.get_world_size()
    dist.all_gather_object(outcomes, mine)
    if error is not None:
        raise error
    for rank, outcome in enumerate(outcomes):
        if outcome is not None:
            is_os_error, text = outcome
            raise (OSError if is_os_error else RuntimeError)(f"{what}: rank {rank} failed ({text})")
    return result


def write_on_rank0(write, what: str):
    """Run `write()` on rank 0 only and return its result there (None elsewhere); every rank returns once it is done,
    or raises when rank 0's write failed (run_shared). A collective: every rank calls."""
    import torch.distributed as dist

    return run_shared(write, dist.get_rank() == 0, f"{what}: nothing was written")
