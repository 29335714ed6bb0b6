"""--optimizer (fastft train, fastft bench): the AdamW that updates the trainable weights.

- adamw: torch's, fused into one kernel per step on a GPU (foreach under FSDP or fp16's GradScaler); fp32 state,
  8 bytes a trainable parameter.
- adamw-8bit: bitsandbytes' AdamW8bit, its two moments kept 8-bit blockwise-quantized (2 bytes a parameter, a
  quarter of torch's): what full fine-tuning's optimizer memory needs. As bitsandbytes recommends (and
  transformers' Trainer does), embedding weights keep 32-bit state, and tensors under 4,096 elements too
  (bitsandbytes' min_8bit_size): SmolLM2-135M's full fine-tuning holds 422 MiB instead of 1,026 (measured).
- paged-adamw-8bit: the same, its state in CUDA unified memory, paged to the CPU when the GPU runs short (QLoRA's
  paged optimizer); a GPU only.
"""
from __future__ import annotations

import torch
from torch import nn

OPTIMIZERS = ("adamw", "adamw-8bit", "paged-adamw-8bit")
EIGHT_BIT = ("adamw-8bit", "paged-adamw-8bit")
SCALES = ("ia3_l", "lora_magnitude_vector")  # the methods' per-channel scales (peft's names, fastft's too)


def eight_bit_problem(name: str, cuda: bool, distributed: str) -> str | None:
    """Why --optimizer `name` cannot run here (a ConfigError's message), or None."""
    if name not in EIGHT_BIT:
        return None
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        return f"--optimizer {name} needs bitsandbytes (pip install bitsandbytes), or use --optimizer adamw"
    if name == "paged-adamw-8bit" and not cuda:
        return ("--optimizer paged-adamw-8bit pages its state through CUDA unified memory and needs a GPU; on the "
                "CPU use --optimizer adamw-8bit")
    if distributed == "fsdp":
        return (f"--optimizer {name} updates whole tensors, not FSDP's shards; use it with --distributed ddp or "
                "none, or --optimizer adamw with FSDP")
    return None


def make_optimizer(name: str, model: nn.Module, lr: float, weight_decay: float, fsdp: bool = False,
                   grad_scaler: bool = False, loraplus_lr_ratio: float = 0.0) -> torch.optim.Optimizer:
    """The --optimizer over the model's trainable parameters (parameter_groups). fsdp: the parameters are, or will
    be (accelerate's plugin shards them in prepare), FSDP's DTensor shards. grad_scaler: fp16's GradScaler runs the
    step; it always calls a fused optimizer's step (the kernel skips an overflowed step inside), and accelerate
    tells a skipped step by the call missing, so the schedule would advance on skipped steps: torch's default
    (foreach) then."""
    eight_bit = name in EIGHT_BIT
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {name!r}")
    groups = parameter_groups(model, weight_decay, embeddings_apart=eight_bit, lr=lr,
                              loraplus_lr_ratio=loraplus_lr_ratio)
    params = [p for group in groups for p in group["params"]]
    if not eight_bit:  # fused: one kernel for every tensor
        fused = bool(params) and not fsdp and not grad_scaler and all(p.device.type == "cuda" for p in params)
        return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay, fused=fused or None)
    if fsdp:
        raise ValueError(f"optimizer {name!r} cannot update FSDP-sharded parameters; use 'adamw'")
    return _adamw_8bit()(groups, lr=lr, weight_decay=weight_decay, is_paged=name == "paged-adamw-8bit")


def parameter_groups(model: nn.Module, weight_decay: float, embeddings_apart: bool = False, lr: float = 0.0,
                     loraplus_lr_ratio: float = 0.0) -> list[dict]:
    """The trainable parameters in groups. With weight decay, biases, normalization weights and the methods'
    per-channel scales (IA3's vectors, DoRA's magnitudes) get none: transformers' Trainer spares the first two;
    decaying a scale toward 0 fights what it learns, and IA3's identity is 1, DoRA's magnitudes the weights' column
    norms. embeddings_apart: the embedding weights in their own group(s) with 32-bit optimizer state (8-bit AdamW).
    loraplus_lr_ratio > 0 (LoRA+, Hayou et al. 2024, as peft's create_loraplus_optimizer): LoRA's B matrices and
    the trainable vectors learn at lr × the ratio, in their own group(s). Without weight decay, embeddings apart or
    LoRA+, one group: the layout of checkpoints written before groups existed."""
    embeddings = {id(module.weight) for module in model.modules() if isinstance(module, nn.Embedding)}
    named = dict(model.named_parameters(remove_duplicate=False))
    decayed = {id(named[name]) for name in _decayed_names(model)}
    no_decay = {id(p) for p in named.values() if id(p) not in decayed}
    for module in model.modules():  # a normalization class whose weights' names transformers' patterns miss
        if "norm" in type(module).__name__.lower() and not isinstance(module, nn.Embedding):
            no_decay |= {id(p) for p in module.parameters(recurse=False)}
    no_decay |= {id(p) for name, p in model.named_parameters() if any(s in name for s in SCALES)}
    if not weight_decay:
        no_decay = set()
    faster = {id(p) for name, p in model.named_parameters() if "lora_B" in name or p.ndim == 1} \
        if loraplus_lr_ratio else set()  # peft's rule: B matrices and every vector (DoRA's magnitudes, biases)
    groups: dict[tuple[bool, bool, bool], list] = {}
    for p in model.parameters():
        if p.requires_grad:
            key = (id(p) in no_decay, embeddings_apart and id(p) in embeddings, id(p) in faster)
            groups.setdefault(key, []).append(p)
    out = []
    for (skip_decay, embedding, lora_b), params in sorted(groups.items()):
        group = {"params": params}
        if skip_decay:
            group["weight_decay"] = 0.0
        if embedding:
            group["optim_bits"] = 32
        if lora_b:
            group["lr"] = lr * loraplus_lr_ratio
        out.append(group)
    return out


# transformers.Trainer.get_decay_parameter_names' patterns: every name holding "bias" (GPT-OSS's expert biases,
# Mamba2's dt_bias, not only `bias`), and the normalization layers' names (a NormedEmbedding's table is decayed)
_NO_DECAY_PATTERNS = [r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)"]


def _decayed_names(model: nn.Module) -> list[str]:
    """The parameter names transformers' Trainer decays (its rule, on the same helper)."""
    from transformers.trainer_pt_utils import get_parameter_names

    return get_parameter_names(model, [nn.LayerNorm], _NO_DECAY_PATTERNS)


_CLASS = None


def _adamw_8bit():
    """bitsandbytes' AdamW8bit, reading a group's own `optim_bits` (32 for the embeddings' group). bitsandbytes'
    own per-parameter overrides live in a process-wide manager keyed by (group, index), which every optimizer of
    the process shares; a group's key belongs to this optimizer alone (and travels in its state dict)."""
    global _CLASS
    if _CLASS is None:
        from bitsandbytes.optim import AdamW8bit

        class AdamW8bitGroupBits(AdamW8bit):
            def get_config(self, gindex, pindex, group):
                config = super().get_config(gindex, pindex, group)
                if "optim_bits" in group:
                    config["optim_bits"] = group["optim_bits"]
                return config

        _CLASS = AdamW8bitGroupBits
    return _CLASS
