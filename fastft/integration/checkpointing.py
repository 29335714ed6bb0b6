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
    checkpoint's `kwargs` (default: non-reentrant). Non-reentrant, the input-grad hooks (the one transformers 5 adds
    with it, and any earlier one transformers or peft added) are removed again."""
    kwargs = {"use_reentrant": False} if kwargs is None else kwargs
    enable = getattr(model, "activation_checkpointing_enable", None)  # transformers 5's name; the old one warns
    if enable is not None:
        enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    drop_input_grad_hooks_if_unneeded(model)


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


def drop_input_grad_hooks_if_unneeded(model: nn.Module) -> None:
    """When `model` checkpoints through transformers and every checkpointed layer is non-reentrant, remove every
    input-grad hook transformers (`enable_input_require_grads`) or peft registered on its modules, whichever call added
    it and in whatever order: non-reentrant checkpointing needs none, and they break torch.compile's graph. Without
    transformers' checkpointing they stay: the user may checkpoint reentrantly another way (torch's checkpoint_wrapper
    after `enable_input_require_grads`, peft's documented recipe), which needs them. Other forward hooks stay. Each
    hook is found on the modules themselves: transformers records only its last call's hooks (a second
    `enable_input_require_grads` overwrites the record, and `disable_input_require_grads` then leaves the first on the
    embedding), and peft's fallback records none."""
    layers = reentrant_layers(model)
    if not layers or any(layers):
        return
    for module in model.modules():
        for key, hook in list(module._forward_hooks.items()):
            if _is_input_grad_hook(hook):
                _remove_forward_hook(module, key)
        if "_require_grads_hooks" in vars(module):  # transformers' record of what it registered: all gone now
            module._require_grads_hooks = []
        vars(module).pop("_require_grads_hook", None)


_INPUT_GRAD_HOOK_NAMES = ("make_inputs_require_grads", "make_inputs_require_grad")  # transformers', peft's


def _is_input_grad_hook(hook) -> bool:
    """Whether `hook` is the closure transformers' enable_input_require_grads or peft (its model wrap, its
    prepare_model_for_kbit_training) registers to make the embedding's output require grad."""
    qualname = getattr(hook, "__qualname__", "")
    package = (getattr(hook, "__module__", None) or "").split(".")[0]
    return (package in ("transformers", "peft") and ".<locals>." in qualname
            and qualname.rsplit(".", 1)[-1] in _INPUT_GRAD_HOOK_NAMES)


def _remove_forward_hook(module: nn.Module, key: int) -> None:
    """What the hook's RemovableHandle.remove() does (register_forward_hook files one key in these three dicts)."""
    for hooks in (module._forward_hooks, module._forward_hooks_with_kwargs, module._forward_hooks_always_called):
        hooks.pop(key, None)
