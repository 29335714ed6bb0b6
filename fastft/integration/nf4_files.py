"""NF4 checkpoints: load one into NF4 layers, save one in bitsandbytes' format.

- `load_nf4_model(path)` builds a transformers model with NF4Linear layers from a safetensors checkpoint:
  a transformers + bitsandbytes 4-bit NF4 checkpoint loads as stored, layer by layer (NF4 where it holds NF4
  weights, dense where it holds dense ones; no bitsandbytes needed); a dense bf16/fp32 one is quantized tensor by
  tensor while it streams in, so host memory peaks near one layer on top of the NF4 model, never at the dense model.
- `save_nf4_model(model, path)` writes config.json (with a bitsandbytes quantization_config) and
  model.safetensors in bitsandbytes' key layout, so transformers + bitsandbytes load it back.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import warnings
from collections import defaultdict

import torch
from torch import nn

from fastft.arguments import check_flag, check_float_dtype, check_path
from fastft.files import merge_into_folder
from fastft.integration.checkpoint_keys import CheckpointKeys, stored_namer
from fastft.integration.nf4_model import (compute_dtype as model_compute_dtype, finish_nf4_model, refuse_adapters,
                                          set_submodule)
from fastft.integration.nf4_skip import (check_skip, default_skip, kept_by_default, kept_dense, plain_forward_layers,
                                         quantizable, skip_entries, skipped)
from fastft.integration.sharded_state import write_on_rank0
from fastft.modules.nf4_linear import NF4Linear, is_conv1d, linear_features
from fastft.quant.nf4_weight import QUANT_STATE_KEY, NF4Weight, local_nf4, quantize_nf4

_INDEX_FILE = "model.safetensors.index.json"
_SINGLE_FILE = "model.safetensors"
# every weights file of a transformers save, one file or shards + index, safetensors or torch
_WEIGHTS_FILES = ("model.safetensors", "model-*.safetensors", "model.safetensors.index.json", "pytorch_model*.bin",
                  "pytorch_model.bin.index.json")


def _checkpoint_files(path: str) -> dict[str, list[str]]:
    """file → keys it holds, for a single-file or sharded safetensors checkpoint."""
    index = os.path.join(path, _INDEX_FILE)
    if os.path.exists(index):
        try:
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
            if not (isinstance(weight_map, dict) and all(isinstance(v, str) for v in weight_map.values())):
                raise ValueError("its weight_map is not a mapping of names to files")
        except (ValueError, KeyError, TypeError) as e:  # (json's and UTF-8's decode errors are ValueErrors)
            raise ValueError(f"load_nf4_model: {index} is damaged ({type(e).__name__}: {e}); save the model again "
                             "or restore the file from a copy") from None
        files: dict[str, list[str]] = defaultdict(list)
        for key, file in weight_map.items():
            files[os.path.join(path, file)].append(key)
        return dict(files)
    single = os.path.join(path, _SINGLE_FILE)
    if not os.path.exists(single):
        raise FileNotFoundError(f"load_nf4_model: no {_SINGLE_FILE} or {_INDEX_FILE} in {path!r} "
                                "(only safetensors checkpoints are supported)")
    with _opened(single) as f:
        return {single: list(f.keys())}


@contextlib.contextmanager
def _opened(file: str, **kwargs):
    """safe_open, a damaged file refused naming it (safetensors' own error names no file)."""
    from safetensors import SafetensorError, safe_open

    if not os.path.isfile(file):
        raise FileNotFoundError(f"load_nf4_model: {file}, which {_INDEX_FILE} lists, is missing; save the model "
                                "again or restore the file from a copy")
    try:
        f = safe_open(file, framework="pt", **kwargs)
    except (SafetensorError, OSError) as e:
        raise ValueError(f"load_nf4_model: {file} ({os.path.getsize(file):,} bytes) is corrupt or truncated ({e}); "
                         "save the model again or restore the file from a copy") from None
    with f:
        yield f


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
    plain = plain_forward_layers(model)
    for name, m in model.named_modules():
        if not quantizable(m) or not name:
            continue
        if f"{name}.weight.{QUANT_STATE_KEY}" in keys:
            targets[name] = True
        elif any(k.startswith(f"{name}.weight.quant_state.bitsandbytes__") for k in keys):
            raise ValueError(f"load_nf4_model: '{name}.weight' is stored 4-bit but not as NF4 (only nf4 is supported)")
        elif (not pre_quantized and not kept_dense(name, skip, defaults) and f"{name}.weight" in keys
              and id(m) in plain):  # as quantize_model: DeepSeek-V4's grouped o_a_proj
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
               or isinstance(model.get_submodule(owner), NF4Linear) or not kept_by_default(owner, heads)]
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

    check_path(path, "load_nf4_model")
    dtype = check_float_dtype(dtype, "load_nf4_model")
    check_flag(double_quant, "load_nf4_model", "double_quant")
    check_flag(use_default_skip, "load_nf4_model", "use_default_skip")
    if model_cls is not None and not (isinstance(model_cls, type) and (
            hasattr(model_cls, "from_config") or hasattr(model_cls, "_from_config"))):
        raise TypeError(f"load_nf4_model: `model_cls` must be a transformers model class (e.g. "
                        f"AutoModelForSequenceClassification or LlamaForCausalLM), got {model_cls!r}")
    if torch.device(device).type == "meta":
        raise ValueError("load_nf4_model: device='meta' loads no values; for a model without memory build it "
                         "under accelerate's init_empty_weights() and quantize_model it")
    files = _checkpoint_files(path)  # first: a wrong path fails here, naming the file it looked for
    config = AutoConfig.from_pretrained(path)
    pre_quantized = _check_quantization_config(config, path)
    if pre_quantized:
        del config.quantization_config  # the layers are fastft's; nothing for transformers to quantize
    model_cls = model_cls or AutoModelForCausalLM
    # the dtype from_pretrained(dtype=...) records: transformers 5.6 built a head class's inner model (AutoModel
    # from the same config) in the config's stored dtype, fp32 beside a bf16 head (its forward then stopped)
    config.dtype = dtype
    with init_empty_weights(include_buffers=False):  # parameters on meta: no memory until loaded
        # Auto classes build with from_config, a concrete class (LlamaForCausalLM, a subclass) with _from_config
        build = getattr(model_cls, "from_config", None) or model_cls._from_config
        model = build(config, dtype=dtype)
    _keep_in_fp32(model, dtype)
    names = CheckpointKeys(model, {k for ks in files.values() for k in ks})
    files = {file: [names.name(k) for k in ks] for file, ks in files.items()}  # the model's names from here on
    keys = {t for ks in files.values() for k in ks for t in names.loads_as(k)}  # (converted: what they make)
    skip = skip_entries(skip)
    check_skip(model, skip, "load_nf4_model")
    pre_quantized = pre_quantized or any(k.endswith(QUANT_STATE_KEY) for k in keys)
    targets = _nf4_targets(model, keys, skip, default_skip(model) if use_default_skip else (), pre_quantized)
    stored_nf4 = [n for n, nf4 in targets.items() if nf4 and skipped(n, skip)]
    if stored_nf4:
        raise ValueError(f"load_nf4_model: skip names {stored_nf4[:4]}, stored NF4 in {path!r}: a pre-quantized "
                         "layer loads as stored; drop it from skip (or load the dense checkpoint)")
    conv1d = {name for name in targets if is_conv1d(model.get_submodule(name))}
    for name in targets:
        linear = model.get_submodule(name)
        layer = NF4Linear(*linear_features(linear), bias=linear.bias is not None,
                          blocksize=blocksize, double_quant=double_quant, device="meta", dtype=dtype)
        layer.from_conv1d = name in conv1d
        set_submodule(model, name, layer)

    unexpected = _stream_checkpoint(model, files, targets, conv1d, dtype, blocksize, double_quant, device, names)
    if not isinstance(model.get_output_embeddings(), NF4Linear):
        model.tie_weights()  # a quantized lm_head keeps its own NF4 weight (saved beside the embedding)
        if not use_default_skip and not pre_quantized:
            _quantize_tied_head(model, skip, blocksize, double_quant, device)
    missing = [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.is_meta]
    missing += [f"{n}.weight" for n in targets if model.get_submodule(n).weight is None]
    initialised = _init_missing(model, missing, path, device, default_skip(model)) if missing else []
    if unexpected or initialised:
        warnings.warn(f"load_nf4_model: {type(model).__name__} from {path!r}: checkpoint tensors it has no place "
                      f"for (dropped): {sorted(unexpected)[:8]}; newly initialised (train them): {initialised[:8]}",
                      stacklevel=2)
    return finish_nf4_model(model.to(device).eval())


def _quantize_tied_head(model: nn.Module, skip, blocksize: int, double_quant: bool, device) -> None:
    """use_default_skip=False quantizes the output head, as quantize_model does; a tied checkpoint holds no weight of
    its own for it (it is the embedding's), so it is quantized here from the embedding it was tied to."""
    head, embeddings = model.get_output_embeddings(), model.get_input_embeddings()
    if type(head) is not nn.Linear or embeddings is None or head.weight is not getattr(embeddings, "weight", None) \
            or head.weight.is_meta:
        return
    name = next(n for n, m in model.named_modules() if m is head)
    if not skipped(name, skip):
        layer = NF4Linear.from_linear(head, blocksize=blocksize, double_quant=double_quant, name=name)
        set_submodule(model, name, layer.to(device))


def _keep_in_fp32(model: nn.Module, dtype: torch.dtype) -> None:
    """transformers' from_pretrained dtype plan, which from_config leaves out: the model's _keep_in_fp32_modules in
    fp32 when it loads in fp16 (T5's wo), its _keep_in_fp32_modules_strict in fp16 and bf16; patterns searched in
    the parameter names as transformers searches them. The (meta) tensors are cast, so the checkpoint's are too."""
    patterns = set()
    if dtype == torch.float16:
        patterns |= set(getattr(model, "_keep_in_fp32_modules", None) or ())
    if dtype in (torch.float16, torch.bfloat16):
        patterns |= set(getattr(model, "_keep_in_fp32_modules_strict", None) or ())
    if not patterns:
        return
    found = re.compile("|".join(f"(?:{p.replace('*', '.*')})" for p in sorted(patterns)))
    for module_name, module in model.named_modules():
        for table in (module._parameters, module._buffers):
            for leaf, tensor in table.items():
                name = f"{module_name}.{leaf}" if module_name else leaf
                if tensor is not None and tensor.is_floating_point() and tensor.dtype != torch.float32 \
                        and found.search(name):
                    cast = tensor.to(torch.float32)
                    table[leaf] = nn.Parameter(cast, tensor.requires_grad) if isinstance(tensor, nn.Parameter) \
                        else cast


def _stream_checkpoint(model, files, targets, conv1d, dtype, blocksize, double_quant, device,
                       names: CheckpointKeys) -> list[str]:
    """Read the checkpoint into `model` one tensor at a time (dense linear targets quantized as they come);
    `files` name the tensors as the model does, `names` maps the stored names to them and converts the tensors
    transformers' conversions convert (per-expert weights merged into a fused one, a fused projection split), once
    all are read. Returns the names the model has no place for."""
    unexpected = []
    bnb_parts: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)  # packed codes and scales: small

    def place(key, tensor):  # a dense tensor: quantized when it is a target's weight
        module_name = _weight_owner(key, targets)
        held = _model_dtype(model, key)
        if held is not None and not tensor.is_floating_point():
            raise ValueError(f"load_nf4_model: '{key}' is stored as {tensor.dtype} {tuple(tensor.shape)} where the "
                             f"model holds a {held} tensor: a packed 4-bit weight without its quantization state "
                             f"('{key}.absmax', '{key}.quant_state.bitsandbytes__nf4') under its name; fastft saves "
                             "of Laguna and Inkling2 written before 2026-12-05 stored them renamed: save them again")
        if tensor.is_floating_point():  # as transformers casts (before bitsandbytes quantizes): to the model's own
            tensor = tensor.to(held or dtype)  # dtype (fp32: _keep_in_fp32_modules), else dtype
        if module_name in targets and key == f"{module_name}.weight":  # a dense linear weight
            if module_name in conv1d:
                tensor = tensor.t().contiguous()  # Conv1D stores (in, out); NF4 holds (out, in)
            model.get_submodule(module_name).weight = quantize_nf4(
                tensor, blocksize=blocksize, double_quant=double_quant, name=key).to(device)
        elif not _assign(model, key, tensor.to(device)):
            unexpected.append(key)

    for file, file_keys in files.items():
        with _opened(file, device="cpu") as f:
            stored_name = {names.name(k): k for k in f.keys() if k in names}  # the index's keys (a file may hold more)
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
    dense = []  # kept dense: bitsandbytes too
    for name, m in model.named_modules():
        if quantizable(m):
            if not m.weight.is_floating_point():  # bitsandbytes' Params4bit (uint8) or Int8Params
                raise TypeError(f"save_nf4_model: {name} is a {type(m).__name__} whose weight is a "
                                f"{type(m.weight).__name__} of {m.weight.dtype}, neither NF4 nor dense: a model "
                                "quantized by bitsandbytes saves with its own save_pretrained")
            dense.append(name)
    dense.sort()
    # transformers' loader keeps dense what this list names (an empty list: nothing; None would bring in its
    # defaults, lm_head among them, and fail on an NF4 head) and the model's _keep_in_fp32_modules, matched by suffix
    # at any character: a dense "classifier" keeps "pre_classifier" dense too
    not_converted = dense + sorted(getattr(model, "_keep_in_fp32_modules", None) or ())
    also_dense = [name for name, m in model.named_modules()
                  if isinstance(m, NF4Linear) and kept_by_default(name, not_converted)]
    if also_dense:
        warnings.warn(f"save_nf4_model: transformers + bitsandbytes would load {', '.join(also_dense[:3])} dense "
                      f"(its llm_int8_skip_modules, the dense layers {dense[:3]}..., or the model's "
                      f"_keep_in_fp32_modules match it by suffix) and fail on "
                      "its NF4 weights; fastft.load_nf4_model loads it. To save a checkpoint transformers loads, keep "
                      "it dense too (quantize_model(..., skip=[its name]))", stacklevel=3)
    return {"quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False,
            "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": next(iter(nested), False),
            "bnb_4bit_compute_dtype": str(dtype).removeprefix("torch."), "bnb_4bit_quant_storage": "uint8",
            "llm_int8_skip_modules": dense, "llm_int8_threshold": 6.0,
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


def save_nf4_model(model: nn.Module, path: str, *, compute_dtype: torch.dtype | None = None) -> None:
    """Write `model` (with NF4Linear layers) to the folder `path` as transformers + bitsandbytes save 4-bit models.

    compute_dtype: the quantization config's bnb_4bit_compute_dtype (what transformers + bitsandbytes compute in
    after loading it); default: the dtype the model computes in (its embeddings'), fp32 where none is found, as
    bitsandbytes' default. A model holding peft adapters is refused (their layers would be saved as the model's).
    An FSDP2-sharded model (`shard_model`) is gathered: every rank calls this, rank 0 writes, all return once written.
    """
    refuse_adapters(model, "save_nf4_model", "save the adapter with fastft.save_adapter (or model.save_pretrained), "
                                             "or merge it first with fastft.merge_and_unload")
    check_path(path, "save_nf4_model")
    computes = (torch.float32, torch.float16, torch.bfloat16)
    if compute_dtype is not None and compute_dtype not in computes + tuple(str(d)[6:] for d in computes):
        raise ValueError(f"save_nf4_model: `compute_dtype` must be torch.float32, torch.float16 or torch.bfloat16 "
                         f"(what bitsandbytes computes in after loading), got {compute_dtype!r}")
    config = getattr(model, "config", None)
    cfg = None
    if config is not None:  # first: a model bitsandbytes' config cannot describe fails before anything is written
        own = model_compute_dtype(model) or torch.float32
        cfg = config.to_dict()
        cfg["quantization_config"] = _quantization_config(model, compute_dtype or own)
        if not cfg.get("architectures"):  # as transformers' save_pretrained writes them (loaders read them)
            cfg["architectures"] = [_model_class(model).__name__]
        if not cfg.get("dtype"):
            cfg["dtype"] = str(own).removeprefix("torch.")
    # CamembertForCausalLM registers lm_head before the embeddings: the head's key came first and the embedding's,
    # which the loader ties it to, was the one dropped
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    tied = {f"{name}.weight" for name, m in model.named_modules() if head is not None and m is head}
    # a parameter under two names (a tied head, a shared layer) is saved once: its later names dropped with the parts
    # an NF4 weight adds under them (quant_map, quant_state: new tensors at every state_dict, no storage to compare)
    aliases = _aliased_keys(model, tied)
    # keys as transformers' save writes them where its load-time renamings would change the model's own (Laguna's
    # shared_experts): a bitsandbytes part renamed elsewhere left its layer without a quant_state
    stored = stored_namer(model)
    tied = {stored(k) for k in tied}

    def unaliased(state: dict) -> dict:
        return {stored(k): t for k, t in state.items()
                if k not in aliases and not any(k.startswith(a + ".") for a in aliases)}

    state = model.state_dict()  # under FSDP2 its DTensors (sharded again, should a forward have left them whole)
    if not any(getattr(t, "_local_tensor", None) is not None for t in state.values()):
        _write(unaliased(state), path, cfg, tied)
        return
    state = unaliased(_gathered_state_dict(model))  # gathered tensors are copies, tied ones too
    write_on_rank0(lambda: _write(state, path, cfg, tied), "save_nf4_model")  # its error raised on every rank


def _model_class(model: nn.Module) -> type:
    """The model's own class, not FSDP2's subclass of it (FSDPLlamaForCausalLM)."""
    from torch.distributed.fsdp import FSDPModule

    return next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule))


def _aliased_keys(model: nn.Module, tied_targets) -> set[str]:
    """The keys of `model`'s parameters and buffers stored under an earlier key too, in _write's order (the tied
    head's last): a tied weight's later name, and every tensor of a module registered under two names."""
    tensors = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    first, aliases = set(), set()
    for key, t in sorted(tensors, key=lambda kv: kv[0] in tied_targets):
        if id(t) in first:
            aliases.add(key)
        first.add(id(t))
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
