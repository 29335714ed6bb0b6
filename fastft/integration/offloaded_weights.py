"""Adapters beside layers accelerate offloaded must have values.

accelerate's offload (`cpu_offload`, `disk_offload`, a device_map with "cpu" or "disk" entries) keeps a layer's
weights on the meta device between calls, its hook loading them from a weights map for each call. peft builds an
adapter on its base layer's device: beside an offloaded layer, on meta, with no values and nothing in the weights
map to load (logits NaN or garbage, backward failing, in peft too). fastft's entry points check what they built
and refuse such a model, saying what works: apply the method first, then offload (or load without offload).
"""
from __future__ import annotations

from torch import nn


def offload_hooks(module: nn.Module) -> list:
    """accelerate's offloading AlignDevicesHooks on `module` (inside a SequentialHook too)."""
    hook = module.__dict__.get("_hf_hook")
    hooks = getattr(hook, "hooks", None) or ([hook] if hook is not None else [])
    return [h for h in hooks if getattr(h, "offload", False) and getattr(h, "weights_map", None) is not None]


def unloadable_meta_parameters(model: nn.Module) -> list[str]:
    """In a model accelerate offloaded, its parameters on the meta device that no offload hook would load (the
    hook's weights map lacks them). [] for a model without offload hooks (meta there is the caller's plan: peft's
    low_cpu_mem_usage, init_empty_weights)."""
    meta = {name for name, p in model.named_parameters() if p.is_meta}
    if not meta:
        return []
    hooked = [(prefix, module, hook) for prefix, module in model.named_modules() for hook in offload_hooks(module)]
    if not hooked:
        return []
    from accelerate.utils import named_module_tensors

    keys_of = {}  # a weights map's dataset, shared by every hook of one offload: its keys read once (no tensor loads)
    for prefix, module, hook in hooked:
        dataset = getattr(hook.weights_map, "dataset", hook.weights_map)
        stored = keys_of.setdefault(id(dataset), set(dataset.keys()))
        at = getattr(hook.weights_map, "prefix", "")
        for name, _ in named_module_tensors(module, recurse=hook.place_submodules):
            if f"{at}{name}" in stored:
                meta.discard(f"{prefix}.{name}" if prefix else name)
    return sorted(meta)


def refuse_adapters_without_values(model: nn.Module, who: str) -> None:
    """Raise when the model holds parameters on the meta device that no accelerate hook loads: adapters built
    beside offloaded layers."""
    missing = unloadable_meta_parameters(model)
    if missing:
        more = f" and {len(missing) - 4} more" if len(missing) > 4 else ""
        raise ValueError(
            f"{who}: {missing[:4]}{more} are on the meta device with no values: the model's layers are offloaded "
            "by accelerate (cpu_offload, disk_offload, or a device_map with 'cpu' or 'disk' entries), and adapters "
            "built beside an offloaded layer are put on meta too (peft's compute NaN or garbage). Build the model "
            "again and apply the method before offloading (fastft.get_peft_model, then accelerate's cpu_offload / "
            "dispatch_model), or load it without offload")
