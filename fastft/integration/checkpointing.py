"""Activation checkpointing of a transformers model, and what it needs of its inputs.

Enabling, across transformers versions: 5.x names it `activation_checkpointing_enable` /
`is_activation_checkpointing`, older releases (and the GPU machine's 5.17) `gradient_checkpointing_enable` /
`is_gradient_checkpointing`. fastft's own runs checkpoint non-reentrantly: the recompute then draws the same dropout
seeds (fastft's kernels take them from torch's CPU generator, whose state it restores).

transformers keeps the checkpoint function on each checkpointed layer (`_gradient_checkpointing_func`: torch's
`checkpoint`, bound by a partial to the caller's kwargs, where a missing use_reentrant means torch's default, True).
Reentrant checkpointing needs the layers' inputs to require grad; transformers 5 and peft hook the embedding to make
its output do so (`enable_input_require_grads`) whatever the mode. Non-reentrant checkpointing needs no such hook,
and its in-graph `requires_grad_()` on a frozen embedding's output stops torch.compile(fullgraph=True) ("returning
intermediate with requires_grad_()") and breaks the graph without fullgraph.
"""
from __future__ import annotations

import functools

from torch import nn
from torch.utils.checkpoint import checkpoint


def enable_checkpointing(model, kwargs: dict | None = None) -> None:
    """Activation checkpointing of every decoder layer of `model` (a transformers PreTrainedModel), with torch
    checkpoint's `kwargs` (default: non-reentrant). Non-reentrant, the input-grad hook transformers 5 adds with it is
    removed again (one the model had before stays)."""
    kwargs = {"use_reentrant": False} if kwargs is None else kwargs
    had_hooks = bool(input_grad_hooks(model))
    enable = getattr(model, "activation_checkpointing_enable", None)  # transformers 5's name; the old one warns
    if enable is not None:
        enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    drop_input_grad_hooks_if_unneeded(model, had_hooks)


def checkpointing_enabled(model) -> bool:
    flag = getattr(type(model), "is_activation_checkpointing", None)
    return bool(model.is_activation_checkpointing if flag is not None else model.is_gradient_checkpointing)


def reentrant_layers(model: nn.Module, training_only: bool = False) -> list[bool]:
    """Per checkpointed module of `model` (those in training mode only, if asked), whether it checkpoints reentrantly."""
    found = []
    for module in model.modules():
        if getattr(module, "gradient_checkpointing", False) is not True or (training_only and not module.training):
            continue
        func = getattr(module, "_gradient_checkpointing_func", None)
        if isinstance(func, functools.partial):
            found.append(func.keywords.get("use_reentrant") in (None, True))
        else:
            found.append(func is checkpoint)
    return found


def input_grad_hooks(model: nn.Module) -> list:
    """The hooks transformers' enable_input_require_grads registered: a list in 5.x, one hook before."""
    hooks = getattr(model, "_require_grads_hooks", None)
    if hooks is None:
        hook = getattr(model, "_require_grads_hook", None)
        hooks = [] if hook is None else [hook]
    return list(hooks)


def drop_input_grad_hooks_if_unneeded(model: nn.Module, had_hooks: bool) -> None:
    """Remove the input-grad hooks added since `had_hooks` was read (the user's own stay) when every checkpointed
    layer is non-reentrant: they are not needed there, and they break torch.compile's graph."""
    layers = reentrant_layers(model)
    if not had_hooks and layers and not any(layers) and input_grad_hooks(model):
        model.disable_input_require_grads()
