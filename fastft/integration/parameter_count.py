"""How many parameters a model holds: each stored weight counted once.

NF4 weights (fastft.quant.NF4Weight) are frozen Parameters whose numel is the logical size, so
`model.parameters()` counts them once; `module.weight` would over-count them (peft's LoRA wrapper forwards
`.weight` to the NF4Linear it wraps, so the same weight is reached through two modules). An NF4Weight held
as a plain attribute (not registered) is still counted, once.
"""
from __future__ import annotations

from torch import nn

from fastft.quant.nf4_weight import NF4Weight


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) element counts of what `model` stores, each tensor once.

    Parameters as `model.parameters()` yields them (shared/tied ones once); every NF4Weight once, by its
    logical element count (out_features × in_features, not its packed bytes). NF4 weights are frozen.
    """
    params = list(model.parameters())
    trainable = sum(p.numel() for p in params if p.requires_grad)
    total = sum(p.numel() for p in params)
    seen: set[int] = set()
    for module in model.modules():
        weight = vars(module).get("weight")  # the stored attribute, not a wrapper's forwarding property
        if isinstance(weight, NF4Weight) and id(weight) not in seen:
            seen.add(id(weight))
            total += weight.numel()
    return trainable, total
