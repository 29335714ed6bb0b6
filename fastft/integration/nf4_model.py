"""NF4 models: quantize one in memory, load a checkpoint into NF4 layers, save one in bitsandbytes' format.

- `quantize_model(model, "nf4")` swaps nn.Linear (and GPT-2's Conv1D) modules for fastft NF4Linear, leaving dense
  what transformers + bitsandbytes leave dense (`default_skip`: the output head, tied and last modules, the model's
  `_keep_in_fp32_modules`, lm_head).
- `load_nf4_model(path)` builds a transformers model with NF4Linear layers from a safetensors checkpoint:
  a transformers + bitsandbytes 4-bit NF4 checkpoint loads as stored, layer by layer (NF4 where it holds NF4
  weights, dense where it holds dense ones; no bitsandbytes needed); a dense bf16/fp32 one is quantized tensor by
  tensor while it streams in, so host memory peaks near one layer on top of the NF4 model, never at the dense model.
- `save_nf4_model(model, path)` writes config.json (with a bitsandbytes quantization_config) and
  model.safetensors in bitsandbytes' key layout, so transformers + bitsandbytes load it back.
- `prepare_model_for_kbit_training(model)`: peft's, plus what peft does only for bitsandbytes models (gradient
  checkpointing, input grads).
- `shard_model(model, mesh)` shards a (quantized, peft-wrapped) model with FSDP2, decoder layer by layer; NF4
  weights shard their packed bytes and scales.
"""
from __future__ import annotations

import functools
import json
import os
import warnings
from collections import defaultdict

import torch
from torch import nn

from fastft.files import merge_into_folder
from fastft.integration.checkpoint_keys import CheckpointKeys
from fastft.integration.checkpointing import (drop_input_grad_hooks_if_unneeded, enable_checkpointing,
                                             input_grad_hooks)
from fastft.integration.module_names import name_hint
from fastft.integration.sharded_state import write_on_rank0
from fastft.modules.nf4_linear import NF4Linear, computes_linear, is_conv1d, linear_features
from fastft.quant.nf4_weight import QUANT_STATE_KEY, NF4Weight, local_nf4, quantize_nf4

DEFAULT_SKIP = ("lm_head",)
_INDEX_FILE = "model.safetensors.index.json"
_SINGLE_FILE = "model.safetensors"
# every weights file of a transformers save, one file or shards + index, safetensors or torch
_WEIGHTS_FILES = ("model.safetensors", "model-*.safetensors", "model.safetensors.index.json", "pytorch_model*.bin",
                  "pytorch_model.bin.index.json")


def _skipped(name: str, skip) -> bool:
    """`skip` entries match a module name or any run of its dotted components ("lm_head", "mlp.down_proj")."""
    padded = f".{name}."
    return any(name == s or f".{s}." in padded for s in skip)


def _kept_by_default(name: str, defaults) -> bool:
    """default_skip's entries match as transformers' should_convert_module matches them for bitsandbytes: the name,
    a module under it ("lm_head" keeps "lm_head.dense"), or a name ending in it at a dot ("wo", "classifier"), not any
    run inside a name (GIT's head `output` kept every layer's `output.dense` dense)."""
    return any(name == d or name.startswith(d + ".") or name.endswith("." + d) for d in defaults)


def _kept_dense(name: str, skip, defaults) -> bool:
    return _skipped(name, skip) or _kept_by_default(name, defaults)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, leaf, module)


def _quantizable(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def default_skip(model: nn.Module) -> tuple[str, ...]:
    """The modules transformers + bitsandbytes leave dense when they quantize `model`: transformers'
    get_keys_to_not_convert (the output embeddings, tied weights, the last module: lm_head, a classifier's score)
    and the model's `_keep_in_fp32_modules` (T5's wo); lm_head always. Quantizing them would give a checkpoint
    transformers cannot load, and a head peft's modules_to_save cannot train."""
    names = set(DEFAULT_SKIP)
    try:
        from transformers import PreTrainedModel
        from transformers.quantizers.base import get_keys_to_not_convert
    except ImportError:  # a plain torch model: lm_head only
        return tuple(sorted(names))
    if isinstance(model, PreTrainedModel):
        # a parameter's name stands for its module (the last parameter may be a bias; LongCat-Flash keeps
        # "classifier.weight" in fp32: its router reads that weight itself)
        names.update(_module_of(n) for n in get_keys_to_not_convert(model))
        names.update(_module_of(n) for n in getattr(model, "_keep_in_fp32_modules", None) or ())
    return tuple(sorted(names))


def _module_of(name: str) -> str:
    return name.removesuffix(".weight").removesuffix(".bias")


def _skip_entries(skip) -> tuple[str, ...]:
    return (skip,) if isinstance(skip, str) else tuple(skip or ())  # one name, not its characters


def _check_skip(model: nn.Module, skip, where: str) -> None:
    """A skip entry that matches no module is a typo that would quantize the layer it meant: refuse it, suggesting
    names from the modules' last parts. DEFAULT_SKIP's entries are let through (skipped anyway; a model without an
    lm_head is fine)."""
    names = [n for n, _ in model.named_modules() if n]
    for entry in skip:
        if entry in DEFAULT_SKIP or any(_skipped(n, (entry,)) for n in names):
            continue
        raise ValueError(f"{where}: skip entry {entry!r} matches no module of {type(model).__name__}; "
                         f"{name_hint(entry, names)}")


def _nf4_memory_footprint(self, return_buffers: bool = True) -> int:
    """transformers' get_memory_footprint, an NF4 weight counted at its stored size (codes and scales), not at the
    dense size its shape and dtype imply."""
    def size(t):
        nf4 = local_nf4(t)
        return nf4.nbytes if nf4 is not None else t.nelement() * t.element_size()
    total = sum(size(p) for p in self.parameters())
    return total + (sum(size(b) for b in self.buffers()) if return_buffers else 0)


def _finish_nf4_model(model: nn.Module) -> nn.Module:
    """What every NF4 model gets: a transformers model reports its real memory footprint."""
    if hasattr(model, "get_memory_footprint"):  # a partial, not a bound method: torch.save(model) pickles it
        model.get_memory_footprint = functools.partial(_nf4_memory_footprint, model)
    return model


def quantize_model(model: nn.Module, quant_type: str = "nf4", *, blocksize: int = 64, double_quant: bool = True,
                   skip=(), use_default_skip: bool = True) -> nn.Module:
    """Replace every nn.Linear (and transformers Conv1D) of `model` (in place) by an NF4Linear holding its
    quantized weight.

    Left dense: `default_skip(model)` — what transformers + bitsandbytes leave dense (output head, tied and last
    modules, `_keep_in_fp32_modules`, lm_head) — plus `skip`: module names or dotted name parts ("mlp.down_proj");
    an entry that matches no module is refused. use_default_skip=False quantizes the defaults too (only `skip`
    stays dense). One layer is quantized at a time and its dense weight dropped, so memory falls as the walk
    proceeds.
    """
    if quant_type != "nf4":
        raise ValueError(f"quantize_model: only quant_type='nf4' is supported, got {quant_type!r}")
    _refuse_adapters(model)
    skip = _skip_entries(skip)
    _check_skip(model, skip, "quantize_model")
    defaults = default_skip(model) if use_default_skip else ()
    parents = {id(child): parent for parent in model.modules() for child in parent.children()}
    targets = [(name, m) for name, m in model.named_modules(remove_duplicate=False)  # every name of a shared layer
               if name and _quantizable(m) and not _kept_dense(name, skip, defaults)]
    quantized, kept = {}, []
    for name, linear in targets:
        if not _plain_forward(linear, parents.get(id(linear))):
            kept.append(name)
            continue
        if id(linear) not in quantized:  # a layer registered under two names gets one NF4Linear at both
            quantized[id(linear)] = NF4Linear.from_linear(linear, blocksize=blocksize, double_quant=double_quant,
                                                          name=name)
            linear.weight = None  # drop the dense weight now, not when the whole walk ends
        _set_submodule(model, name, quantized[id(linear)])
    if kept:
        warnings.warn(f"quantize_model: left {len(kept)} layer(s) dense ({', '.join(kept[:3])}"
                      f"{', ...' if len(kept) > 3 else ''}): an nn.Linear subclass with its own forward, or a "
                      "layer whose owner reads its weight directly (nn.MultiheadAttention's out_proj); an NF4Linear "
                      "in its place would change what it computes", stacklevel=2)
    return _finish_nf4_model(model)


def _plain_forward(module: nn.Module, parent: nn.Module | None) -> bool:
    """The layer computes x·Wᵀ + b through its own forward, as NF4Linear does."""
    if isinstance(parent, nn.MultiheadAttention):
        return False
    return is_conv1d(module) or computes_linear(module)


def _refuse_adapters(model: nn.Module) -> None:
    from peft import PeftModel
    from peft.tuners.tuners_utils import BaseTunerLayer

    if isinstance(model, PeftModel) or any(isinstance(m, BaseTunerLayer) for m in model.modules()):
        raise TypeError("quantize_model: the model holds peft adapters, whose own nn.Linear layers (lora_A, lora_B) "
                        "would be quantized and frozen; quantize the base model first, then "
                        "fastft.get_peft_model(quantized, config) (QLoRA)")


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


# ----------------------------------------------------------------------------------------------
# loading

def _checkpoint_files(path: str) -> dict[str, list[str]]:
    """file → keys it holds, for a single-file or sharded safetensors checkpoint."""
    from safetensors import safe_open

    index = os.path.join(path, _INDEX_FILE)
    if os.path.exists(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        files: dict[str, list[str]] = defaultdict(list)
        for key, file in weight_map.items():
            files[os.path.join(path, file)].append(key)
        return dict(files)
    single = os.path.join(path, _SINGLE_FILE)
    if not os.path.exists(single):
        raise FileNotFoundError(f"load_nf4_model: no {_SINGLE_FILE} or {_INDEX_FILE} in {path!r} "
                                "(only safetensors checkpoints are supported)")
    with safe_open(single, framework="pt") as f:
        return {single: list(f.keys())}


def _owner(model: nn.Module, name: str) -> tuple[nn.Module | None, str]:
    """(the module holding the parameter or buffer `name`, its leaf name); None for a module the model lacks."""
    owner_name, _, leaf = name.rpartition(".")
    try:
        return (model.get_submodule(owner_name) if owner_name else model), leaf
    except AttributeError:
        return None, leaf


def _model_dtype(model: nn.Module, name: str) -> torch.dtype | None:
    """The floating dtype of the model's (meta) parameter or buffer `name`, None where it has none."""
    owner, leaf = _owner(model, name)
    held = None if owner is None else owner._parameters.get(leaf, owner._buffers.get(leaf))
    return held.dtype if held is not None and held.is_floating_point() else None


def _assign(model: nn.Module, name: str, value: torch.Tensor) -> bool:
    """Put a loaded tensor in place of the (meta) parameter or buffer `name`; False when the model has none."""
    owner, leaf = _owner(model, name)
    if owner is not None and leaf in owner._parameters:
        old = owner._parameters[leaf]
        owner._parameters[leaf] = nn.Parameter(value, requires_grad=old.requires_grad if old is not None else False)
    elif owner is not None and leaf in owner._buffers:
        owner._buffers[leaf] = value
    else:
        return False
    return True


def _check_quantization_config(config, path: str) -> bool:
    """True for a bitsandbytes 4-bit checkpoint; refuses other quantized ones (their weights are not NF4)."""
    qcfg = getattr(config, "quantization_config", None)
    if qcfg is None:
        return False
    qcfg = qcfg if isinstance(qcfg, dict) else qcfg.to_dict()
    if qcfg.get("quant_method") != "bitsandbytes" or not qcfg.get("load_in_4bit"):
        raise ValueError(f"load_nf4_model: {path!r} is quantized as {qcfg.get('quant_method')!r} "
                         f"(load_in_4bit={qcfg.get('load_in_4bit')}); only bitsandbytes 4-bit NF4 checkpoints and "
                         "dense ones load. Load it with transformers, or start from the dense checkpoint")
    return True


def _nf4_targets(model: nn.Module, keys: set[str], skip, defaults, pre_quantized: bool) -> dict[str, bool]:
    """Linear module name → True when its weight is bnb-NF4 in the checkpoint, False when dense (to quantize).

    A pre-quantized checkpoint's layers stay as stored: a dense one there was kept dense on purpose
    (llm_int8_skip_modules, _keep_in_fp32_modules), so only a dense checkpoint's layers are quantized (`skip` aside,
    and, as quantize_model leaves them, layers that compute otherwise than x·Wᵀ + b).
    """
    targets = {}
    parents = {id(child): parent for parent in model.modules() for child in parent.children()}
    for name, m in model.named_modules():
        if not _quantizable(m) or not name:
            continue
        if f"{name}.weight.{QUANT_STATE_KEY}" in keys:
            targets[name] = True
        elif any(k.startswith(f"{name}.weight.quant_state.bitsandbytes__") for k in keys):
            raise ValueError(f"load_nf4_model: '{name}.weight' is stored 4-bit but not as NF4 (only nf4 is supported)")
        elif (not pre_quantized and not _kept_dense(name, skip, defaults) and f"{name}.weight" in keys
              and _plain_forward(m, parents.get(id(m)))):  # as quantize_model: DeepSeek-V4's grouped o_a_proj
            targets[name] = False
    return targets


def _weight_owner(key: str, targets) -> str | None:
    """The target module whose weight `key` is ("<module>.weight") or a bnb part of ("<module>.weight.absmax", ...);
    None for other keys. A module name may hold a component starting with "weight" ("conv.weight_proj")."""
    parts = key.split(".")
    for i in range(len(parts) - 1, 0, -1):
        if parts[i] == "weight" and ".".join(parts[:i]) in targets:
            return ".".join(parts[:i])
    return None


def _init_missing(model: nn.Module, missing: list[str], path: str, device, heads) -> list[str]:
    """Initialise, as transformers does, the head modules (`heads`: default_skip's names) the checkpoint holds
    nothing of (a new classification head). Anything else missing — part of a module, or a module of the body,
    which would train from random weights, dense — is a checkpoint of another model: KeyError naming the tensors."""
    owners: dict[str, list[str]] = defaultdict(list)
    for name in missing:
        owners[name.rpartition(".")[0]].append(name)
    partial = [n for owner, names in owners.items() for n in names
               if len(names) != len(list(model.get_submodule(owner).parameters(recurse=False)))
               or isinstance(model.get_submodule(owner), NF4Linear) or not _kept_by_default(owner, heads)]
    if partial:
        raise KeyError(f"load_nf4_model: the checkpoint in {path!r} lacks {partial[:8]}"
                       + (f" and {len(partial) - 8} more" if len(partial) > 8 else "")
                       + f" (is it a checkpoint of {type(model).__name__}'s architecture?)")
    for owner in owners:
        module = model.get_submodule(owner)
        module.to_empty(device=device, recurse=False)
        if hasattr(model, "_init_weights"):
            model._init_weights(module)
        else:
            module.reset_parameters()
    return missing


def load_nf4_model(path: str, *, model_cls=None, dtype: torch.dtype = torch.bfloat16, blocksize: int = 64,
                   double_quant: bool = True, skip=(), use_default_skip: bool = True, device="cpu") -> nn.Module:
    """A transformers model from the checkpoint folder `path`, its linear layers as fastft NF4Linear.

    A transformers + bitsandbytes 4-bit checkpoint (or one save_nf4_model wrote) loads layer by layer as stored:
    NF4 weights as NF4Linear (their blocksize and double quantization kept), dense ones dense (what it was saved
    with llm_int8_skip_modules or _keep_in_fp32_modules stays so); `skip` cannot make a stored NF4 layer dense.
    A dense checkpoint's linear weights are quantized (blocksize, double_quant) as they stream in, except
    `default_skip(model)` (unless use_default_skip=False), `skip` (names or dotted name parts) and what
    quantize_model leaves dense (a Linear subclass with its own forward). Other floating tensors are cast to `dtype`
    (those the model keeps in fp32 stay fp32). Keys are read as transformers reads them
    (fastft.integration.checkpoint_keys: a checkpoint in the original layout, per-expert weights merged, fused
    projections split).
    model_cls: a transformers model class (default AutoModelForCausalLM); as in transformers, checkpoint tensors the
    class has no place for are dropped and modules the checkpoint lacks entirely (a new head) are initialised, with a
    warning naming both.
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    files = _checkpoint_files(path)  # first: a wrong path fails here, naming the file it looked for
    config = AutoConfig.from_pretrained(path)
    pre_quantized = _check_quantization_config(config, path)
    if pre_quantized:
        del config.quantization_config  # the layers are fastft's; nothing for transformers to quantize
    model_cls = model_cls or AutoModelForCausalLM
    with init_empty_weights(include_buffers=False):  # parameters on meta: no memory until loaded
        # Auto classes build with from_config, a concrete class (LlamaForCausalLM, a subclass) with _from_config
        build = getattr(model_cls, "from_config", None) or model_cls._from_config
        model = build(config, dtype=dtype)
    names = CheckpointKeys(model, {k for ks in files.values() for k in ks})
    files = {file: [names.name(k) for k in ks] for file, ks in files.items()}  # the model's names from here on
    keys = {t for ks in files.values() for k in ks for t in names.loads_as(k)}  # (converted: what they make)
    skip = _skip_entries(skip)
    _check_skip(model, skip, "load_nf4_model")
    pre_quantized = pre_quantized or any(k.endswith(QUANT_STATE_KEY) for k in keys)
    targets = _nf4_targets(model, keys, skip, default_skip(model) if use_default_skip else (), pre_quantized)
    stored_nf4 = [n for n, nf4 in targets.items() if nf4 and _skipped(n, skip)]
    if stored_nf4:
        raise ValueError(f"load_nf4_model: skip names {stored_nf4[:4]}, stored NF4 in {path!r}: a pre-quantized "
                         "layer loads as stored; drop it from skip (or load the dense checkpoint)")
    conv1d = {name for name in targets if is_conv1d(model.get_submodule(name))}
    for name in targets:
        linear = model.get_submodule(name)
        layer = NF4Linear(*linear_features(linear), bias=linear.bias is not None,
                          blocksize=blocksize, double_quant=double_quant, device="meta", dtype=dtype)
        layer.from_conv1d = name in conv1d
        _set_submodule(model, name, layer)

    unexpected = _stream_checkpoint(model, files, targets, conv1d, dtype, blocksize, double_quant, device, names)
    if not isinstance(model.get_output_embeddings(), NF4Linear):
        model.tie_weights()  # a quantized lm_head keeps its own NF4 weight (saved beside the embedding)
    missing = [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.is_meta]
    missing += [f"{n}.weight" for n in targets if model.get_submodule(n).weight is None]
    initialised = _init_missing(model, missing, path, device, default_skip(model)) if missing else []
    if unexpected or initialised:
        warnings.warn(f"load_nf4_model: {type(model).__name__} from {path!r}: checkpoint tensors it has no place "
                      f"for (dropped): {sorted(unexpected)[:8]}; newly initialised (train them): {initialised[:8]}",
                      stacklevel=2)
    return _finish_nf4_model(model.to(device).eval())


def _stream_checkpoint(model, files, targets, conv1d, dtype, blocksize, double_quant, device,
                       names: CheckpointKeys) -> list[str]:
    """Read the checkpoint into `model` one tensor at a time (dense linear targets quantized as they come);
    `files` name the tensors as the model does, `names` maps the stored names to them and converts the tensors
    transformers' conversions convert (per-expert weights merged into a fused one, a fused projection split), once
    all are read. Returns the names the model has no place for."""
    from safetensors import safe_open

    unexpected = []
    bnb_parts: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)  # packed codes and scales: small

    def place(key, tensor):  # a dense tensor: quantized when it is a target's weight
        module_name = _weight_owner(key, targets)
        if tensor.is_floating_point():  # as transformers casts (before bitsandbytes quantizes): to the model's own
            tensor = tensor.to(_model_dtype(model, key) or dtype)  # dtype (fp32: _keep_in_fp32_modules), else dtype
        if module_name in targets and key == f"{module_name}.weight":  # a dense linear weight
            if module_name in conv1d:
                tensor = tensor.t().contiguous()  # Conv1D stores (in, out); NF4 holds (out, in)
            model.get_submodule(module_name).weight = quantize_nf4(
                tensor, blocksize=blocksize, double_quant=double_quant, name=key).to(device)
        elif not _assign(model, key, tensor.to(device)):
            unexpected.append(key)

    for file, file_keys in files.items():
        with safe_open(file, framework="pt", device="cpu") as f:
            stored_name = {names.name(k): k for k in f.keys()}
            for key in file_keys:
                converted = names.converted_into(key)
                if converted and targets.get(_weight_owner(converted, targets)):
                    # packed codes and their scales cannot be merged or split as dense rows are (transformers'
                    # own bitsandbytes save concatenates each part, its quant_state's JSON too)
                    raise ValueError(f"load_nf4_model: '{stored_name[key]}' is stored NF4 but transformers converts "
                                     "it on loading (merges or splits it); only dense tensors can be converted: load "
                                     "the dense checkpoint")
                tensor = f.get_tensor(stored_name[key])
                module_name = _weight_owner(key, targets)
                if converted:
                    names.add(key, stored_name[key], tensor)
                elif targets.get(module_name):
                    bnb_parts[module_name][key] = tensor
                else:
                    place(key, tensor)
                del tensor  # a layer's dense copy is gone before the next one is read
    for key, tensor in names.converted(model):
        place(key, tensor)
    for module_name, parts in bnb_parts.items():
        model.get_submodule(module_name).weight = NF4Weight.from_bnb_state_dict(parts, f"{module_name}.weight",
                                                                                device=device)
    return unexpected


# ----------------------------------------------------------------------------------------------
# saving

def _quantization_config(model: nn.Module, dtype: torch.dtype) -> dict:
    weights = [local_nf4(m.weight) for m in model.modules() if isinstance(m, NF4Linear) and m.weight is not None]
    nested = {w.double_quant for w in weights}
    if len(nested) > 1:
        raise ValueError("save_nf4_model: some NF4 layers use double quantization and some do not; bitsandbytes' "
                         "config has one bnb_4bit_use_double_quant flag")
    dense = sorted(name for name, m in model.named_modules() if _quantizable(m))  # kept dense: bitsandbytes too
    return {"quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False,
            "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": next(iter(nested), False),
            "bnb_4bit_compute_dtype": str(dtype).removeprefix("torch."), "bnb_4bit_quant_storage": "uint8",
            "llm_int8_skip_modules": dense or None, "llm_int8_threshold": 6.0,
            "llm_int8_has_fp16_weight": False, "llm_int8_enable_fp32_cpu_offload": False}


def _gathered_state_dict(model: nn.Module) -> dict:
    """An FSDP2-sharded model's state dict gathered whole, one tensor at a time, onto rank 0's CPU ({} on the other
    ranks; a collective: every rank calls), its NF4 weights in bitsandbytes' keys."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    state = {}
    for key, t in full.items():
        state.update(t.bnb_state_dict(key) if isinstance(t, NF4Weight) else {key: t})
    return state


def save_nf4_model(model: nn.Module, path: str, *, compute_dtype: torch.dtype = torch.bfloat16) -> None:
    """Write `model` (with NF4Linear layers) to the folder `path` as transformers + bitsandbytes save 4-bit models.

    An FSDP2-sharded model (`shard_model`) is gathered: every rank calls this, rank 0 writes, all return once written.
    """
    config = getattr(model, "config", None)
    cfg = None
    if config is not None:  # first: a model bitsandbytes' config cannot describe fails before anything is written
        cfg = config.to_dict()
        cfg["quantization_config"] = _quantization_config(model, compute_dtype)
    # CamembertForCausalLM registers lm_head before the embeddings: the head's key came first and the embedding's,
    # which the loader ties it to, was the one dropped
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    tied = {f"{name}.weight" for name, m in model.named_modules() if head is not None and m is head}
    state = model.state_dict()  # under FSDP2 its DTensors (sharded again, should a forward have left them whole)
    if not any(getattr(t, "_local_tensor", None) is not None for t in state.values()):
        _write(state, path, cfg, tied)
        return
    # gathered tensors are copies, tied ones too: drop the keys the unsharded save drops (the tied head's)
    aliases = _aliased_keys(model.state_dict(keep_vars=True), tied)
    state = {k: t for k, t in _gathered_state_dict(model).items()
             if k not in aliases and not any(k.startswith(a + ".") for a in aliases)}  # (an NF4 weight's parts)
    write_on_rank0(lambda: _write(state, path, cfg, tied), "save_nf4_model")  # its error raised on every rank


def _aliased_keys(params: dict, tied_targets) -> set[str]:
    """The keys of `params` (a state dict of the parameters themselves) whose parameter is stored under an earlier
    key too, in _write's order (the tied head's last)."""
    first, aliases = set(), set()
    for key in sorted(params, key=lambda k: k in tied_targets):
        if id(params[key]) in first:
            aliases.add(key)
        first.add(id(params[key]))
    return aliases


def _write(tensors: dict, path: str, cfg: dict | None, tied_targets=()) -> None:
    """tied_targets: keys to drop rather than keep when their tensor is stored under another key too (the output
    head's weight: the loader re-ties it to the input embedding, as transformers' save drops `_tied_weights_keys`)."""
    from safetensors.torch import save_file

    state, seen = {}, set()
    order = sorted(tensors, key=lambda k: k in tied_targets)  # stable: the head last, whatever the module order
    for key, t in ((k, tensors[k]) for k in order):
        t = t.detach()
        # the same tensor twice is a tied weight (lm_head = embed_tokens): saved once, re-tied on load; views of
        # one storage at other offsets or strides (a split fused QKV) are different tensors
        where = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride()) \
            if t.numel() else None
        if where is not None and where in seen:
            continue
        if where is not None:
            seen.add(where)
        state[key] = t.contiguous().cpu()

    def write(folder):  # the folder as a whole: weights and config of one save (a tokenizer saved there stays)
        save_file(state, str(folder / _SINGLE_FILE), metadata={"format": "pt"})
        if cfg is not None:
            (folder / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))

    # a checkpoint saved there before in shards: its index would be read first, its shards kept for nothing
    merge_into_folder(path, write, alternatives=(_WEIGHTS_FILES,))


# ----------------------------------------------------------------------------------------------
# FSDP2

def _decoder_layer_names(model: nn.Module) -> set[str]:
    """transformers names the blocks that must stay whole (`_no_split_modules`); look through peft's wrappers."""
    for m in model.modules():
        names = getattr(m, "_no_split_modules", None)
        if names:
            return set(names)
    return set()


def _shares_a_parameter_outside(model: nn.Module, name: str, block: nn.Module) -> bool:
    inside = {id(p) for p in block.parameters()}
    return any(id(p) in inside and not n.startswith(name + ".")
               for n, p in model.named_parameters(remove_duplicate=False))


def shard_model(model: nn.Module, mesh=None, *, reshard_after_forward: bool = True, mp_policy=None,
                layer_classes=None) -> nn.Module:
    """FSDP2-shard `model` in place: `fully_shard` on every decoder layer, then on the root; returns it.

    Works on a plain, an NF4-quantized (`quantize_model` / `load_nf4_model`) and a peft-wrapped
    (`fastft.get_peft_model`) model — apply LoRA first, then shard. NF4 weights shard their packed bytes and
    scales (each rank holds 1/world of them; the forward all-gathers 4-bit codes, not a dense copy).
    mesh: a 1-D DeviceMesh (default: all ranks of the initialised process group, on the parameters' device type);
    the model must already be on that device. mp_policy: a torch.distributed.fsdp.MixedPrecisionPolicy.
    layer_classes: class names of the blocks to shard one by one (default: the model's `_no_split_modules`); a block
    holding a weight tied to a module outside it (RoBERTa's embeddings and head) is left to the root's unit.
    Raises ValueError, naming the weight, for an NF4 weight that cannot shard evenly over the mesh.
    """
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from fastft.quant.nf4_tensor_ops import check_shardable

    if mesh is None:
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("shard_model: no mesh given and torch.distributed is not initialised "
                               "(launch with torchrun / accelerate, or pass mesh=init_device_mesh(...))")
        device_type = next((p.device.type for p in model.parameters()), "cpu")
        mesh = init_device_mesh(device_type, (dist.get_world_size(),))
    if mesh.ndim != 1:
        raise ValueError(f"shard_model: expected a 1-D device mesh, got {mesh.ndim}-D ({mesh})")
    world = mesh.size()
    for name, p in model.named_parameters():
        if isinstance(p, NF4Weight):
            check_shardable(p, world, name)
    names = set(layer_classes) if layer_classes else _decoder_layer_names(model)
    layers = [(n, m) for n, m in model.named_modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(f"shard_model: no layer of {type(model).__name__} is one of {sorted(names)}; pass "
                         "layer_classes=[...] (the class names of its transformer blocks)")
    # a block sharing a weight with a module outside it (RoBERTa's embeddings, tied to its head) stays in the root's
    # unit: sharded on its own, the two modules would hold two parameters, trained apart and saved untied
    layers = [m for n, m in layers if not _shares_a_parameter_outside(model, n, m)]
    kwargs = {"mesh": mesh, "reshard_after_forward": reshard_after_forward}
    if mp_policy is not None:
        kwargs["mp_policy"] = mp_policy
    for layer in layers:
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)
    return model


def ignore_nf4_in_ddp(model: nn.Module) -> nn.Module:
    """Tell DistributedDataParallel not to broadcast `model`'s NF4 weights; returns the model.

    DDP broadcasts every parameter from rank 0 when it wraps a model, by concatenating them — which a packed NF4
    weight cannot take part in. The NF4 weights are frozen and every rank quantizes or loads the same bytes, so
    there is nothing to synchronise. Call on the module you hand to DDP (or to accelerate's `prepare`), after
    `get_peft_model`: the names are relative to it.
    """
    from torch.nn.parallel import DistributedDataParallel

    names = [name for name, p in model.named_parameters() if isinstance(p, NF4Weight)]
    names += list(getattr(model, "_ddp_params_and_buffers_to_ignore", ()))
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, sorted(set(names)))
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
