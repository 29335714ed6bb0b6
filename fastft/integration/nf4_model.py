"""NF4 models: quantize one in memory, and what every NF4 model gets.

- `quantize_model(model, "nf4")` swaps nn.Linear (and GPT-2's Conv1D) modules for fastft NF4Linear, leaving dense
  what transformers + bitsandbytes leave dense (fastft.integration.nf4_skip).
- `prepare_model_for_kbit_training(model)`: peft's, plus what peft does only for bitsandbytes models (gradient
  checkpointing, input grads).
- `compute_dtype(model)`: the dtype a quantized model computes in.
Loading and saving checkpoints: fastft.integration.nf4_files; FSDP2 / DDP: fastft.integration.nf4_sharding.
"""
from __future__ import annotations

import functools
import inspect
import warnings

import torch
from torch import nn

from fastft.arguments import check_flag, check_model
from fastft.integration.checkpointing import (drop_input_grad_hooks_if_unneeded, enable_checkpointing,
                                             input_grad_hooks)
from fastft.integration.nf4_bitsandbytes import bitsandbytes_nf4_adopted
from fastft.integration.nf4_skip import (check_skip, default_skip, kept_dense, plain_forward_layers, quantizable,
                                         skip_entries)
from fastft.modules.nf4_linear import NF4Linear
from fastft.quant.nf4_weight import check_quantizable, local_nf4


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, leaf, module)


def _nf4_memory_footprint(self, return_buffers: bool = True) -> int:
    """transformers' get_memory_footprint, an NF4 weight counted at its stored size (codes and scales), not at the
    dense size its shape and dtype imply."""
    def size(t):
        nf4 = local_nf4(t)
        return nf4.nbytes if nf4 is not None else t.nelement() * t.element_size()
    total = sum(size(p) for p in self.parameters())
    return total + (sum(size(b) for b in self.buffers()) if return_buffers else 0)


def _save_nf4_pretrained(self, save_directory, *args, **kwargs) -> None:
    """transformers' save_pretrained for a model holding fastft NF4 layers: written by fastft.save_nf4_model, with
    the bitsandbytes quantization config transformers needs to load the NF4 tensors (its own save wrote them without
    one: a checkpoint that does not load). A model without NF4 layers (merged) saves as transformers saves it."""
    if not any(isinstance(m, NF4Linear) for m in self.modules()):
        return type(self).save_pretrained(self, save_directory, *args, **kwargs)
    # transformers' own defaults spelled out change nothing (safe_serialization=True: transformers 4's, which 5's
    # Trainer versions still pass)
    defaults = {name: p.default for name, p in inspect.signature(type(self).save_pretrained).parameters.items()}
    defaults.setdefault("safe_serialization", True)
    unsupported = sorted(k for k, v in kwargs.items()
                         if k != "is_main_process" and (k not in defaults or not _same(defaults[k], v)))
    if args or unsupported:
        raise TypeError(f"save_pretrained: {type(self).__name__} holds fastft NF4 layers and saves through "
                        f"fastft.save_nf4_model(model, path), which takes no {unsupported or 'positional options'}; "
                        "call it directly (or save a dense model: fastft.merge_and_unload(model))")
    from fastft.integration.nf4_files import save_nf4_model
    from fastft.integration.sharded_state import is_sharded

    if kwargs.get("is_main_process", True) or is_sharded(self):  # FSDP2: every rank gathers, rank 0 writes
        save_nf4_model(self, save_directory)


def _same(default, value) -> bool:
    try:
        return bool(default == value)
    except Exception:  # a tensor, say: not a default
        return False


def finish_nf4_model(model: nn.Module, undo: list | None = None) -> nn.Module:
    """What every NF4 model gets: a transformers model reports its real memory footprint and saves a checkpoint
    transformers + bitsandbytes load. Partials, not bound methods: torch.save(model) pickles them. `undo`: gets the
    calls that put the model's own back."""
    for name, method in (("get_memory_footprint", _nf4_memory_footprint), ("save_pretrained", _save_nf4_pretrained)):
        if hasattr(model, name):
            if undo is not None:
                undo.append(functools.partial(_restore_attribute, model, name, vars(model).get(name, _MISSING)))
            setattr(model, name, functools.partial(method, model))
    return model


_MISSING = object()


def _restore_attribute(obj, name: str, value) -> None:
    if value is _MISSING:
        vars(obj).pop(name, None)
    else:
        setattr(obj, name, value)


def layers_to_quantize(model: nn.Module, skip=(), use_default_skip: bool = True):
    """(the (name, layer) pairs quantize_model replaces by NF4Linear: every name of a shared layer; the names of the
    layers it would quantize but leaves dense for a forward of their own). Reads the modules' structure only, so a
    meta-device skeleton (`AutoModelForCausalLM.from_config` under `torch.device("meta")`) answers before any weight
    loads."""
    skip = skip_entries(skip)
    check_skip(model, skip, "quantize_model")
    defaults = default_skip(model) if use_default_skip else ()
    plain = plain_forward_layers(model)
    named = [(name, m) for name, m in model.named_modules(remove_duplicate=False)  # every name of a shared layer
             if name and quantizable(m)]
    # a layer registered under several names is one layer: kept dense at every name if any of them is kept dense
    dense = {id(m) for name, m in named if kept_dense(name, skip, defaults)}
    targets = [(name, m) for name, m in named if id(m) not in dense]
    return [(n, m) for n, m in targets if id(m) in plain], [n for n, m in targets if id(m) not in plain]


def quantize_model(model: nn.Module, quant_type: str = "nf4", *, blocksize: int | None = None,
                   double_quant: bool | None = None, skip=(), use_default_skip: bool = True) -> nn.Module:
    """Replace every nn.Linear (and transformers Conv1D) of `model` (in place) by an NF4Linear holding its
    quantized weight.

    Left dense: `default_skip(model)` — what transformers + bitsandbytes leave dense (output head, tied and last
    modules, `_keep_in_fp32_modules`, lm_head) — plus `skip`: module names or dotted name parts ("mlp.down_proj");
    an entry that matches no module is refused. use_default_skip=False quantizes the defaults too (only `skip`
    stays dense). One layer is quantized at a time and its dense weight dropped, so memory falls as the walk
    proceeds. blocksize / double_quant: 64 / True by default. A model transformers loaded with a bitsandbytes NF4
    `BitsAndBytesConfig` keeps its layers' codes and scales as they are (now fastft NF4Linear layers,
    fastft.integration.nf4_bitsandbytes), and any layer left to quantize gets their layout by default; a layout
    asked for that is not theirs is refused, as on a model quantized before.
    """
    if quant_type != "nf4":
        raise ValueError(f"quantize_model: only quant_type='nf4' is supported, got {quant_type!r}")
    check_flag(double_quant, "quantize_model", "double_quant", none_ok=True)
    check_flag(use_default_skip, "quantize_model", "use_default_skip")
    refuse_adapters(model, "quantize_model", "their own nn.Linear layers (lora_A, lora_B) would be quantized and "
                    "frozen; quantize the base model first, then fastft.get_peft_model(quantized, config) (QLoRA)")
    with bitsandbytes_nf4_adopted(model, "quantize_model", warn=False):  # bitsandbytes' NF4 layers: as they are
        return _quantize_model(model, blocksize, double_quant, skip, use_default_skip)


def _quantize_model(model: nn.Module, blocksize: int | None, double_quant: bool | None, skip,
                    use_default_skip: bool) -> nn.Module:
    held = next((w for m in model.modules() if isinstance(m, NF4Linear) and (w := local_nf4(m.weight)) is not None),
                None)  # a layout the model has already (quantized before, or bitsandbytes'): the default for the rest
    blocksize = blocksize if blocksize is not None else held.blocksize if held is not None else 64
    double_quant = double_quant if double_quant is not None else held.double_quant if held is not None else True
    _refuse_another_layout(model, blocksize, double_quant)
    _refuse_integer_weights(model)
    targets, kept = layers_to_quantize(model, skip, use_default_skip)
    for name, linear in targets:  # every weight before the first layer changes: a bad one left a half-quantized model
        check_quantizable(linear.weight, blocksize, name=f"{name}.weight")
    quantized = {}
    last_name = {id(linear): name for name, linear in targets}
    for name, linear in targets:
        if id(linear) not in quantized:  # a layer registered under two names gets one NF4Linear at both
            quantized[id(linear)] = NF4Linear.from_linear(linear, blocksize=blocksize, double_quant=double_quant,
                                                          name=name)
        set_submodule(model, name, quantized[id(linear)])
        if last_name[id(linear)] == name:  # every name holds the NF4Linear: the dense weight goes now, not when the
            linear.weight = None  # walk ends (dropped before, an interrupt in between lost the layer's weight)
    if kept:
        warnings.warn(f"quantize_model: left {len(kept)} layer(s) dense ({', '.join(kept[:3])}"
                      f"{', ...' if len(kept) > 3 else ''}): an nn.Linear subclass with its own forward, or a "
                      "layer whose owner reads its weight directly (nn.MultiheadAttention's out_proj); an NF4Linear "
                      "in its place would change what it computes", stacklevel=2)
    return finish_nf4_model(model)


def _refuse_integer_weights(model: nn.Module) -> None:
    """A model bitsandbytes quantized in a form fastft does not read (8-bit, FP4; its NF4 layers are adopted before):
    its layers were reported as "left dense", and no layer became NF4Linear."""
    quantized = [(name, m) for name, m in model.named_modules()
                 if quantizable(m) and isinstance(m.weight, torch.Tensor) and not m.weight.is_floating_point()]
    if quantized:
        name, layer = quantized[0]
        raise TypeError(f"quantize_model: {name} is a {type(layer).__name__} whose weight is {layer.weight.dtype} "
                        f"({len(quantized)} such layers): the model is quantized already by bitsandbytes, in a form "
                        "fastft does not read (8-bit or FP4; NF4 layers it takes as they are); quantize the dense "
                        "model (load it without quantization_config, or with BitsAndBytesConfig(load_in_4bit=True, "
                        "bnb_4bit_quant_type='nf4')), or load a bitsandbytes NF4 checkpoint with "
                        "fastft.load_nf4_model(path)")


def _refuse_another_layout(model: nn.Module, blocksize: int, double_quant: bool) -> None:
    """A model already (partly) quantized in another layout: its NF4 layers would silently keep theirs."""
    for name, module in model.named_modules():
        weight = local_nf4(module.weight) if isinstance(module, NF4Linear) else None
        if weight is not None and (weight.blocksize, weight.double_quant) != (blocksize, double_quant):
            raise ValueError(f"quantize_model: {name} is already NF4 with blocksize={weight.blocksize}, "
                             f"double_quant={weight.double_quant}, not the blocksize={blocksize}, "
                             f"double_quant={double_quant} asked; quantize the dense model, or leave blocksize and "
                             "double_quant unset to quantize the rest alike")


def refuse_adapters(model: nn.Module, op: str, instead: str) -> None:
    """TypeError for a model holding peft adapters, saying what to do `instead` (and for anything but a model)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    from fastft.integration.base_layers import is_peft_model

    check_model(model, op)
    if is_peft_model(model) or any(isinstance(m, BaseTunerLayer) for m in model.modules()):
        raise TypeError(f"{op}: the model holds peft adapters; {instead}")


def prepare_model_for_kbit_training(model: nn.Module, use_gradient_checkpointing: bool = True,
                                    gradient_checkpointing_kwargs: dict | None = None) -> nn.Module:
    """peft's prepare_model_for_kbit_training for a fastft NF4 model (quantize_model / load_nf4_model).

    peft freezes the model and upcasts its dense bf16/fp16 parameters to fp32 for any model, but enables gradient
    checkpointing (and, for reentrant checkpointing, input grads) only for models transformers loaded with
    bitsandbytes (`is_loaded_in_4bit`); fastft's NF4 models do not set that flag (transformers and peft would then
    reach for bitsandbytes). This runs peft's function and then does that part as peft does. Returns the model.
    With use_reentrant=False the embedding gets no hook making its output require grad (peft adds none then;
    transformers 5 would), so torch.compile(fullgraph=True) traces the model.
    """
    from peft import prepare_model_for_kbit_training as peft_prepare

    refuse_adapters(model, "prepare_model_for_kbit_training", "it freezes every parameter, the adapters' too: call "
                    "it on the base model, before fastft.get_peft_model")
    check_flag(use_gradient_checkpointing, "prepare_model_for_kbit_training", "use_gradient_checkpointing")
    kwargs = dict(gradient_checkpointing_kwargs or {})
    if use_gradient_checkpointing and not hasattr(model, "gradient_checkpointing_enable"):
        raise TypeError(f"prepare_model_for_kbit_training: {type(model).__name__} has no gradient_checkpointing_enable "
                        "(not a transformers model); pass use_gradient_checkpointing=False")
    peft_did_it = getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False)
    model = peft_prepare(model, use_gradient_checkpointing=use_gradient_checkpointing,
                         gradient_checkpointing_kwargs=kwargs)
    reentrant = kwargs.get("use_reentrant", True)
    if use_gradient_checkpointing and not peft_did_it:
        enable_checkpointing(model, kwargs)
        if reentrant and not input_grad_hooks(model):  # reentrant checkpointing needs inputs that require grad
            model.enable_input_require_grads()
    if use_gradient_checkpointing and not reentrant:  # transformers 5 hooks the embedding anyway (see checkpointing)
        drop_input_grad_hooks_if_unneeded(model)
    return model


def compute_dtype(model: nn.Module) -> torch.dtype | None:
    """The dtype a quantized model computes in: its input embeddings' (or first dense floating parameter's), read
    now, so `model.to(dtype)` or peft's fp32 upcast counts. An NF4 weight's own dtype cannot tell: floating-point
    casts leave it as it was quantized, and a layer computes in its input's dtype (but an fp32 input on a bf16 weight
    in bf16, fastft.ops.shared.compute_input)."""
    get_embeddings = getattr(model, "get_input_embeddings", None)
    try:
        embeddings = get_embeddings() if get_embeddings is not None else None
    except (NotImplementedError, AttributeError):  # transformers raises for models without embeddings
        embeddings = None
    weight = getattr(embeddings, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.is_floating_point() and local_nf4(weight) is None:
        return weight.dtype
    # else a frozen dense base parameter's (a norm's): not an adapter's, which peft keeps in fp32
    return next((p.dtype for n, p in model.named_parameters() if p.is_floating_point() and local_nf4(p) is None
                 and not p.requires_grad and "lora_" not in n), None)
