"""Who builds the model for a (method, implementation) run: fastft and the peers it is measured against.

Every run starts from `build()`, a fresh base model (same seed, same weights), and returns the model to train:
- fastft: `apply_method(..., implementation="fastft")`, then `fastft.patch_model` when that exists (the fused
  model patching of issue 7; skipped until it lands, and the row says whether it was used).
- peft: `apply_method(..., implementation="peft")`; for QLoRA the base is first quantized to NF4 by
  bitsandbytes through transformers' `replace_with_bnb_linear` + `BitsAndBytesConfig` (peft+bnb); full
  fine-tuning has no peft code, so its peer is the plain transformers model.
- liger: the peft build with Liger's Llama kernels (RoPE, SwiGLU, RMSNorm, fused linear cross-entropy).
  Liger patches transformers' Llama classes for the whole process, so its runs go after all others.
- unsloth: its FastLanguageModel (LoRA and QLoRA only). It imports trl/datasets and patches transformers on
  import, so its runs go last. Never run here: no Unsloth in this environment.
A peer that is not installed gives a "not installed" row; a method a peer lacks an "unavailable" row.
"""
from __future__ import annotations

import importlib.util
import tempfile
import warnings

import torch
from torch import nn

from fastft.apps.bench.harness import release_freed_memory
from fastft.integration.checkpointing import checkpointing_enabled, drop_input_grad_hooks_if_unneeded
from fastft.integration.methods import MethodOptions, apply_method

PEERS = ("peft", "liger", "unsloth")
IMPLEMENTATIONS = ("fastft", *PEERS)      # run order: the process-wide patchers come last
PEFT_METHODS = ("lora", "qlora", "dora", "prefix", "prompt", "ia3", "full")   # peft has no bottleneck adapters
UNSLOTH_METHODS = ("lora", "qlora")


class Unavailable(NotImplementedError):
    """This implementation has no path for this method (the row says why, no number is made up)."""


def label(implementation: str, method: str) -> str:
    """The row's name for an implementation of a method (peft on bitsandbytes for QLoRA, …)."""
    if implementation in ("fastft", "unsloth"):
        return implementation
    base = "transformers" if method == "full" else "peft+bnb" if method == "qlora" else "peft"
    return base + ("+liger" if implementation == "liger" else "")


def no_path(implementation: str, method: str) -> str | None:
    """Why a peer has no path for a method at all, known before its package is looked for (a peer that lacks
    the method reads "unavailable" whether it is installed or not), or None."""
    if implementation == "unsloth" and method not in UNSLOTH_METHODS:
        return f"the Unsloth peer is wired for lora and qlora only, not {method!r}"
    if implementation in ("peft", "liger") and method not in PEFT_METHODS:
        return f"peft has no {method!r} method"
    return None


def missing_package(implementation: str, method: str) -> str | None:
    """The package a run needs and lacks, or None."""
    needs = {"peft": ["peft"], "liger": ["peft", "liger_kernel"], "unsloth": ["unsloth"]}.get(implementation, [])
    if method == "qlora" and implementation in ("peft", "liger"):
        needs.append("bitsandbytes")
    return next((name for name in needs if importlib.util.find_spec(name) is None), None)


def preload() -> None:
    """What every run sets up once in a process, done up front, so the first run's CPU memory (an RSS delta)
    excludes it: the imports, and one throwaway training step of a tiny model (autograd's, the optimizer's and the
    allocator's first-use state: ~20 MiB charged to whichever row came first, fastft's in the default order, where
    the tiny shape's rows measure ~3 MiB), and one of a fastft-patched LoRA model (its own first-use state)."""
    import peft  # noqa: F401
    import transformers.models.llama.modeling_llama  # noqa: F401

    import fastft.integration.peft_lora  # noqa: F401
    from fastft.apps.bench.shapes import build_model

    cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=cuda):  # build_model seeds: the caller's random streams stay as they were
        ids = torch.zeros(1, 16, dtype=torch.long)
        # a plain model, then a fastft-patched LoRA one: the patched code path's own first-use state (its kernels'
        # and masks' caches) was charged to the first fastft row (7.8 MiB where the same row later reads 2.7)
        for model in (build_model(shape="tiny", seq_len=16),
                      _fastft("lora", MethodOptions(), lambda: build_model(shape="tiny", seq_len=16), True)[0]):
            optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            del model, optimizer
    release_freed_memory()


def prepare(implementation: str, method: str, options: MethodOptions, build,
            patch_model: bool = True) -> tuple[nn.Module, dict]:
    """(model to train, notes for the row) for one run; `build()` returns a fresh base model. `patch_model`:
    fastft rows go through fastft.patch_model when it exists."""
    with warnings.catch_warnings():
        # peft reads transformers' deprecated `is_gradient_checkpointing`; nothing for the user to act on.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return _prepare(implementation, method, options, build, patch_model)


def _prepare(implementation, method, options, build, patch_model):
    if implementation == "fastft":
        return _fastft(method, options, build, patch_model)
    if implementation in ("peft", "liger"):
        return _peft(method, options, build, liger=implementation == "liger")
    if implementation == "unsloth":
        return _unsloth(method, options, build)
    raise ValueError(f"unknown implementation {implementation!r}; expected one of {', '.join(IMPLEMENTATIONS)}")


def _fastft(method, options, build, patch_model):
    import fastft

    model = apply_method(build(), method, options, implementation="fastft")
    patch = getattr(fastft, "patch_model", None) if patch_model else None   # issue 7's fused model patching
    if patch is not None:
        patch(model)
    return model, {"patched": patch is not None}


def _peft(method, options, build, liger: bool):
    if no_path("peft", method):
        raise Unavailable(no_path("peft", method))
    model = build()
    if liger:
        _apply_liger(model)
    notes = {}
    if method == "qlora":
        quantize_with_bnb(model)
        method, notes = "lora", {"quantized_by": "bitsandbytes nf4"}
    trained = apply_method(model, method, options, implementation="peft")  # the model itself for full
    # peft hooks the embedding to require grad for gradient checkpointing; the bench's non-reentrant checkpointing
    # needs none and fastft's rows drop it (backward work, and compiled a graph break): the peer drops it too
    drop_input_grad_hooks_if_unneeded(trained.get_base_model() if hasattr(trained, "get_base_model") else trained)
    return trained, notes


def _apply_liger(model: nn.Module) -> None:
    if getattr(model.config, "model_type", None) != "llama":
        raise Unavailable(f"the Liger peer is wired for Llama models only, not {model.config.model_type!r}")
    from liger_kernel.transformers import apply_liger_kernel_to_llama

    apply_liger_kernel_to_llama(rope=True, swiglu=True, rms_norm=True, cross_entropy=False,
                                fused_linear_cross_entropy=True, model=model)


def quantize_with_bnb(model: nn.Module, skip=("lm_head",)) -> nn.Module:
    """Quantize `model`'s linear layers to bitsandbytes NF4 in place (double quantization, blocks of 64, compute
    in the model's dtype), as transformers does when it loads with BitsAndBytesConfig(load_in_4bit=True)."""
    import bitsandbytes as bnb
    from transformers import BitsAndBytesConfig
    from transformers.integrations.bitsandbytes import replace_with_bnb_linear

    dtype = next(model.parameters()).dtype
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=dtype)
    dense = {name: m.weight.data for name, m in model.named_modules() if type(m) is nn.Linear}
    replace_with_bnb_linear(model, modules_to_not_convert=list(skip), quantization_config=config)
    for name, module in model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):   # made on the meta device: quantize the dense weight into it
            w = dense.pop(name)
            module.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4", blocksize=64,
                                              compress_statistics=True).to(w.device)
            if module.bias is not None:
                raise Unavailable("quantize_with_bnb: biased linear layers are not wired (Llama has none)")
    model.is_loaded_in_4bit = True   # what peft reads to wrap Linear4bit layers with its bnb LoRA layer
    return model


def _unsloth(method, options, build):
    if no_path("unsloth", method):
        raise Unavailable(no_path("unsloth", method))
    from unsloth import FastLanguageModel

    base = build()
    dtype = next(base.parameters()).dtype
    seq_len = base.config.max_position_embeddings
    checkpointing = checkpointing_enabled(base)
    with tempfile.TemporaryDirectory(prefix="fastft-bench-unsloth-") as folder:   # Unsloth loads checkpoints
        base.save_pretrained(folder)
        del base
        torch.cuda.empty_cache()
        model, _ = FastLanguageModel.from_pretrained(folder, max_seq_length=seq_len, dtype=dtype,
                                                     load_in_4bit=method == "qlora")
    model = FastLanguageModel.get_peft_model(
        model, r=options.rank, lora_alpha=options.alpha, lora_dropout=0.0, bias="none",
        target_modules=list(options.target_modules), use_rslora=options.rslora,
        use_gradient_checkpointing=checkpointing)
    return model, {}
