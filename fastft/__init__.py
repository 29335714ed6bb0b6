"""fastft: fused Triton kernels and a thin PEFT layer for fast LoRA / QLoRA fine-tuning."""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

# Everything loads on first use, so that `import fastft` (and the `fastft` command's first step) is quick: the
# command installs its Ctrl-C handling before torch, transformers and peft are imported (seconds), and a Ctrl-C then
# is its one line, not Python's traceback. The torch.library ops (torch.ops.fastft.*) register when fastft.ops is
# imported, which every layer, method and patch does.
_SUBMODULES = ("apps", "arguments", "files", "integration", "kernels", "modules", "ops", "quant")
_LAZY = {
    "lora_linear": "fastft.ops",
    "qlora_linear": "fastft.ops",
    "get_peft_model": "fastft.integration.peft_lora",
    "patch_peft": "fastft.integration.peft_lora",
    "load_adapter": "fastft.integration.peft_lora",
    "add_adapter": "fastft.integration.peft_lora",
    "save_adapter": "fastft.integration.peft_lora",
    "merge_and_unload": "fastft.integration.peft_lora",
    "UnmatchedTargetWarning": "fastft.integration.lora_config",
    "NF4RoundingWarning": "fastft.modules.qlora",
    "register_attention": "fastft.integration.attention",
    "apply_method": "fastft.integration.methods",
    "MethodOptions": "fastft.integration.methods",
    "BottleneckAdapterConfig": "fastft.integration.methods.adapter",
    "quantize_model": "fastft.integration.nf4_model",
    "load_nf4_model": "fastft.integration.nf4_files",
    "save_nf4_model": "fastft.integration.nf4_files",
    "prepare_model_for_kbit_training": "fastft.integration.nf4_model",
    "shard_model": "fastft.integration.nf4_sharding",
    "ignore_nf4_in_ddp": "fastft.integration.nf4_sharding",
    "patch_model": "fastft.integration.patching",
    "unpatch_model": "fastft.integration.patching",
}

__all__ = ["quant", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name in _SUBMODULES:
        return importlib.import_module(f"fastft.{name}")
    raise AttributeError(f"module 'fastft' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY, *_SUBMODULES})
