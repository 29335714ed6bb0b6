"""Activation checkpointing of a transformers model, across transformers versions: 5.x names it
`activation_checkpointing_enable` / `is_activation_checkpointing`, older releases (and the GPU machine's 5.17)
`gradient_checkpointing_enable` / `is_gradient_checkpointing`. Always non-reentrant: the recompute then draws the
same dropout seeds (fastft's kernels take them from torch's CPU generator, whose state it restores)."""
from __future__ import annotations


def enable_checkpointing(model) -> None:
    """Non-reentrant activation checkpointing of every decoder layer of `model` (a transformers PreTrainedModel)."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def checkpointing_enabled(model) -> bool:
    flag = getattr(type(model), "is_activation_checkpointing", None)
    return bool(model.is_activation_checkpointing if flag is not None else model.is_gradient_checkpointing)
