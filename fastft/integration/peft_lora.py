"""The thin PEFT layer for LoRA: peft does the bookkeeping, fastft does the hot path.

peft's LoraModel already handles target matching, layers_to_transform, rank/alpha patterns,
modules_to_save, named adapters, merging and its save format, and the ecosystem reads that format.
fastft validates the config up front (clear errors: lora_config), lets peft build the model, then swaps each
plain LoRA Linear to `FusedLoraLinear` (same state, fused forward). Layers the fused op does not cover run peft's
own forward, exactly: LoRA on embeddings and convolutions, and on transformers' Conv1D (GPT-2, whose weight is
stored (in, out): peft sets fan_in_fan_out=True for them). Creating, saving and loading follow that one rule.
This module holds the entry points (get_peft_model, add_adapter, load_adapter, merge_and_unload, save_adapter,
patch_peft); a saved adapter is checked by adapter_files, and the PeftModels returned route their own
add_adapter/load_adapter here (adapter_routing).
"""
from __future__ import annotations

import contextlib
import os
import shutil
import warnings
from pathlib import Path

import peft
from peft import LoraConfig, PeftConfig, PeftModel
from peft.tuners.lora import Linear as PeftLoraLinear
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from fastft.arguments import check_flag, check_float_dtype, check_model, check_path
from fastft.files import merge_into_folder, one_version
from fastft.integration.adapter_files import WEIGHTS_NAMES, check_adapter_fits
from fastft.integration.adapter_routing import adapter_call, route_adapter_methods
from fastft.integration.base_layers import is_peft_model, transformers_model
from fastft.integration.checkpointing import drop_input_grad_hooks_if_unneeded
from fastft.integration.lora_config import check_loadable, validate_lora_config, with_quantized_targets
from fastft.integration.methods.ia3_nf4 import NF4IA3Linear
from fastft.integration.methods.prompt import whole_prompt_encoders
from fastft.integration.nf4_bitsandbytes import bitsandbytes_nf4_adopted
from fastft.integration.nf4_model import refuse_adapters
from fastft.integration.offloaded_weights import refuse_adapters_without_values
from fastft.integration.sharded_state import gathered_adapter_state, is_sharded, write_on_rank0
from fastft.integration.tied_weights import untie_adapted_weights
from fastft.modules.lora import FusedLoraLinear
from fastft.modules.nf4_linear import NF4Linear
from fastft.modules.qlora import FusedQLoraLinear, NF4RoundingWarning


def get_peft_model(model: nn.Module, config, adapter_name: str = "default", **kwargs) -> PeftModel:
    """Like `peft.get_peft_model`, with fused LoRA layers. Only adapter (and modules_to_save) weights train.

    On a model quantized by `fastft.quantize_model` / `load_nf4_model` this is QLoRA: the NF4 layers get
    FusedQLoraLinear adapters (forward through fastft.ops.qlora_linear). A model transformers loaded with a
    bitsandbytes NF4 `BitsAndBytesConfig` becomes such a model first, in place and on the same storage
    (fastft.integration.nf4_bitsandbytes). LoRA on embeddings, convolutions and Conv1D layers (GPT-2; peft sets
    fan_in_fan_out=True for them) runs unfused, through peft's own forward.
    Other methods' configs (LoraConfig with use_dora, IA3Config, PrefixTuningConfig, PromptTuningConfig,
    PromptEncoderConfig, fastft's BottleneckAdapterConfig) go to their rooms in fastft.integration.methods.
    """
    check_model(model, "get_peft_model")
    check_adapter_name(adapter_name, "get_peft_model")
    refuse_peft_model(model, "get_peft_model")
    with bitsandbytes_nf4_adopted(model, "get_peft_model"):  # undone if the config is refused
        # a PeftModel's base (get_base_model()): peft would build adapter 'default' again in its layers, zeroing B
        refuse_adapters(model, "get_peft_model", "a second get_peft_model would build its adapters again over the "
                        "trained ones: add another with fastft.add_adapter(peft_model, name, config), or give a fresh "
                        "base (or peft_model.unload())")
        peft_model = _get_peft_model(model, config, adapter_name, **kwargs)
        if not kwargs.get("low_cpu_mem_usage"):  # there, adapters on meta are peft's plan: the caller loads them
            refuse_adapters_without_values(peft_model, "get_peft_model")
        return peft_model


def _get_peft_model(model: nn.Module, config, adapter_name: str, **kwargs) -> PeftModel:
    if kwargs.get("mixed"):  # peft's PeftMixedModel: its add_adapter builds unfused layers, and none on NF4 ones
        raise ValueError("get_peft_model: mixed=True (peft's PeftMixedModel, adapters of several kinds) is not "
                         "supported by fastft; several adapters of one kind: fastft.add_adapter / "
                         "fastft.load_adapter on the model fastft.get_peft_model returns")
    if not isinstance(config, LoraConfig) or config.use_dora:
        from fastft.integration.methods import get_method_model

        return get_method_model(model, config, adapter_name=adapter_name, **kwargs)
    validate_lora_config(config, model)
    with_quantized_targets(config, model)
    with checked_patterns():
        return fuse_lora_layers(quiet_peft_model(model, config, adapter_name, **kwargs), "get_peft_model")


@contextlib.contextmanager
def checked_patterns():
    """Without peft's warning that rank/alpha_pattern keys "did not match any targeted module", for a config whose
    keys fastft checked (validate_lora_config: each matches a module or parameter peft adapts). peft looks at module
    names only, so it names the keys that set the rank of a parameter (Mixtral's fused experts under transformers 5),
    the ones its own MoE conversion adds among them: nothing true is left to say."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The following (rank|alpha)_pattern keys did not match any "
                                                  "targeted module", category=RuntimeWarning)
        yield


def check_adapter_name(name, what: str) -> None:
    """peft keys modules by adapter name: one with a '.' (a module path) or not a string failed deep inside torch."""
    if not isinstance(name, str) or not name or "." in name:
        raise ValueError(f"{what}: `adapter_name` must be a non-empty str without '.', got {name!r}")


def refuse_peft_model(model: nn.Module, what: str) -> None:
    """A model with adapters would be wrapped in a second one (peft only warns): its save would mix two methods'
    tensors under one config, and a load would drop the inner ones."""
    if isinstance(model, PeftModel) or callable(getattr(model, "get_base_model", None)):  # fastft's adapter models
        more = (", or add a second adapter to this one with fastft.add_adapter or fastft.load_adapter"
                if is_peft_model(model) else "")
        raise TypeError(f"{what}: model is already a {type(model).__name__} holding adapters; give it the base "
                        f"model (a fresh one, or the base after unload()){more}")


@contextlib.contextmanager
def quiet_checkpointing_deprecation():
    """Hides the FutureWarning peft's PeftModel raises reading transformers' deprecated `is_gradient_checkpointing`
    (nothing for the user to act on)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def quiet_peft_model(model: nn.Module, config, adapter_name: str = "default", **kwargs) -> PeftModel:
    """`peft.get_peft_model` without peft's deprecation warning (quiet_checkpointing_deprecation). Every method's room
    builds through it."""
    trainable = {name: p.requires_grad for name, p in model.named_parameters()}
    held = {id(m) for m in model.modules() if isinstance(m, BaseTunerLayer)}
    try:
        with quiet_checkpointing_deprecation():
            wrapped = peft.get_peft_model(model, config, adapter_name=adapter_name, **kwargs)
    except BaseException:  # (Ctrl-C while peft wraps the layers one by one): the model as it was given
        _unwrap_adapter_layers(model, trainable, held)
        raise
    # peft hooks the embedding for checkpointing of either mode (and transformers' enable may have hooked it before):
    # non-reentrant needs none, and compiles without
    drop_input_grad_hooks_if_unneeded(model)
    return wrapped


def _unwrap_adapter_layers(model: nn.Module, trainable: dict, held: set) -> None:
    """Undo a get_peft_model that failed midway: each adapter layer peft put in (not among `held`, the ids of those
    the model had) gives its place back to its base layer, and the parameters get their requires_grad back."""
    for name, module in list(model.named_modules(remove_duplicate=False)):
        if isinstance(module, BaseTunerLayer) and id(module) not in held and name:
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, leaf, module.get_base_layer())
    for name, p in model.named_parameters():
        if name in trainable:
            p.requires_grad_(trainable[name])


def quiet_peft_load(model: nn.Module, path, **kwargs) -> PeftModel:
    """`PeftModel.from_pretrained` without peft's deprecation warning: every method's load_adapter goes through it."""
    with quiet_checkpointing_deprecation():
        return PeftModel.from_pretrained(model, str(path), **kwargs)


def add_adapter(model: PeftModel, adapter_name: str, config) -> PeftModel:
    """`model.add_adapter` with validation, keeping every LoRA (DoRA, QLoRA) or IA3 layer fused."""
    if not is_peft_model(model):
        raise TypeError(f"add_adapter expects a PeftModel (from fastft.get_peft_model), got {type(model).__name__}")
    if not isinstance(config, (LoraConfig, peft.IA3Config)):
        raise TypeError(f"add_adapter: config is a {type(config).__name__}; fastft adds LoraConfig (DoRA included) "
                        "and IA3Config adapters (use the PeftModel's own add_adapter for other kinds)")
    check_adapter_name(adapter_name, "add_adapter")
    route_adapter_methods(model)  # model.add_adapter below: peft's, a failure partway undone
    with adapter_call() as call:
        if isinstance(config, peft.IA3Config):
            from fastft.integration.methods.ia3 import add_ia3_adapter

            model = add_ia3_adapter(model, adapter_name, config)
        else:
            if getattr(config, "use_dora", False):
                from fastft.integration.methods.dora import validate_dora_config as validate
            else:
                validate = validate_lora_config
            validate(config, transformers_model(model))
            with checked_patterns():
                model.add_adapter(adapter_name, with_quantized_targets(config, transformers_model(model)))
        if not call.options.get("low_cpu_mem_usage"):  # there, adapters on meta are peft's plan
            refuse_adapters_without_values(model, "add_adapter")
    return model if isinstance(config, peft.IA3Config) else fuse_lora_layers(model, "add_adapter")


def load_adapter(model: nn.Module, path: str | os.PathLike, adapter_name: str = "default",
                 is_trainable: bool = False) -> PeftModel:
    """Load a peft-format LoRA adapter (saved by peft or fastft) into `model`, with fused layers.

    `model` is a plain transformers model (a PeftModel is built around it) or a PeftModel (the adapter is
    added under `adapter_name`). The adapter is checked against the model first. Other methods' adapters (IA3,
    prefix, prompt, P-tuning in peft's format; fastft bottleneck adapters) load through their rooms.
    """
    check_model(model, "load_adapter")
    check_path(path, "load_adapter")
    check_adapter_name(adapter_name, "load_adapter")
    check_flag(is_trainable, "load_adapter", "is_trainable")
    if is_peft_model(model):
        route_adapter_methods(model)  # model.add_adapter/load_adapter below (here and in the rooms): peft's
        path = _own_subfolder_on_reload(model, path, adapter_name)
    with adapter_call(), one_version(path) as files, errors_naming(files, path):
        # (a save of the folder meanwhile: the files of one save, never one's config with the next one's weights)
        loaded = _load_adapter(model, files, adapter_name, is_trainable)
    refuse_adapters_without_values(loaded, "load_adapter")
    return loaded


def _own_subfolder_on_reload(model: PeftModel, path, adapter_name: str):
    """A reload of adapter `adapter_name` (not 'default') from a folder peft's save of several adapters wrote
    ('default' at the root, every other adapter in a subfolder of its name) reads that adapter's subfolder.
    transformers.Trainer's load_best_model_at_end calls `load_adapter(checkpoint, active_adapter)` on the root:
    peft then loads 'default''s weights into the trained adapter (silently, where their shapes agree)."""
    root = Path(path)
    own = root / adapter_name
    reload = adapter_name != "default" and adapter_name in model.peft_config
    if not (reload and (root / "adapter_config.json").is_file() and (own / "adapter_config.json").is_file()):
        return path
    warnings.warn(f"load_adapter: {root} holds adapter 'default' at its root and adapter {adapter_name!r} in {own} "
                  f"(peft's save of several adapters): reloading {adapter_name!r} from {own}", stacklevel=3)
    return own


@contextlib.contextmanager
def errors_naming(read: Path, given):
    """An error of the load names the folder the caller gave, not the private folder of links it read through."""
    try:
        yield
    except Exception as e:
        if read != Path(given):
            e.args = tuple(a.replace(str(read), os.fspath(given)) if isinstance(a, str) else a for a in e.args)
        raise


def _load_adapter(model: nn.Module, path, adapter_name: str, is_trainable: bool) -> PeftModel:
    if is_peft_model(model):
        return _load_checked(model, path, adapter_name, is_trainable)
    refuse_peft_model(model, "load_adapter")
    with bitsandbytes_nf4_adopted(model, "load_adapter"):  # undone if the adapter does not fit
        return _load_checked(model, path, adapter_name, is_trainable)


def _load_checked(model: nn.Module, path, adapter_name: str, is_trainable: bool) -> PeftModel:
    from fastft.integration.methods import load_method_adapter

    loaded = load_method_adapter(model, path, adapter_name=adapter_name, is_trainable=is_trainable)
    if loaded is not None:
        return loaded
    base = transformers_model(model)
    config = check_adapter_fits(base, path)
    check_loadable(config, base, Path(path), isinstance(model, PeftModel))
    config = with_quantized_targets(config, base)
    config.inference_mode = not is_trainable
    if isinstance(model, PeftModel):
        if adapter_name in model.peft_config:  # peft's reload of an adapter's weights (Trainer's resume and best-model
            # load call it so): into that adapter, whose layers are built and fused already
            _check_same_adapter(model.peft_config[adapter_name], PeftConfig.from_pretrained(str(path)), path,
                                adapter_name)
            model.load_adapter(str(path), adapter_name=adapter_name, is_trainable=is_trainable)
            return fuse_lora_layers(model, "load_adapter")
        model.add_adapter(adapter_name, config)  # built from this config (QLoRA layers registered above)
        if is_trainable:
            model.set_requires_grad(adapter_name)
        model.load_adapter(str(path), adapter_name=adapter_name, is_trainable=is_trainable)
        return fuse_lora_layers(model, "load_adapter")
    peft_model = quiet_peft_load(model, path, adapter_name=adapter_name, is_trainable=is_trainable, config=config)
    return fuse_lora_layers(peft_model, "load_adapter")


# what a reload may change: how the adapter was made or where from, not the layers its weights go into
_RELOAD_FREE = {"inference_mode", "base_model_name_or_path", "revision", "peft_version", "init_lora_weights",
                "runtime_config", "task_type", "auto_mapping", "lora_dropout"}


def _check_same_adapter(existing, saved, path, adapter_name: str) -> None:
    """A reload's weights go into the existing adapter's layers: a saved config that builds other layers (another
    rank, other targets; peft would load what fits and skip the rest silently) is refused naming the field."""
    have, want = existing.to_dict(), saved.to_dict()
    differ = sorted(k for k in set(have) | set(want) if k not in _RELOAD_FREE and have.get(k) != want.get(k))
    if differ:
        field = differ[0]
        raise ValueError(f"load_adapter: {path} holds an adapter with {field}={want.get(field)!r}, but the model's "
                         f"adapter {adapter_name!r} has {field}={have.get(field)!r}; its weights cannot be loaded "
                         "into that adapter: load it under another adapter_name")


def merge_and_unload(model: PeftModel, *, requantize: bool = False, dtype=None, safe_merge: bool = False,
                     adapter_names: list[str] | None = None, progressbar: bool = False):
    """Merge the active adapters (or `adapter_names`, as peft's) into the base weights and return the plain model
    (peft's merge_and_unload; `safe_merge` and `progressbar` are peft's too).

    QLoRA layers are dequantized first and come back as dense nn.Linear (in `dtype`, default the dtype the model
    computes in: its embeddings', so the merged model runs after `model.to(dtype)`, peft's fp32 upcast or an fp16
    checkpoint loaded as bf16): W + ΔW exactly, no second rounding (IA3 on NF4 layers likewise: W ⊙ l, in dense);
    NF4 layers without an adapter come back dense in that dtype too, so the model saves as a plain checkpoint. With
    requantize=True they stay NF4Linear: W + ΔW is quantized again, which keeps the 4-bit footprint at the cost of one
    more NF4 rounding (README: "QLoRA"; refused for IA3 on NF4).
    Adapters merged into the NF4 weights before (peft's merge_adapter()) already carry that rounding, which no
    unmerge undoes: the dense result keeps it, with a warning naming them.
    """
    from fastft.integration.nf4_model import compute_dtype

    if not is_peft_model(model):
        raise TypeError(f"merge_and_unload expects a PeftModel, got {type(model).__name__}")
    check_flag(requantize, "merge_and_unload", "requantize")
    dtype = check_float_dtype(dtype, "merge_and_unload", none_ok=True)
    if any(config.is_prompt_learning for config in model.peft_config.values()):
        raise TypeError("merge_and_unload: prefix / prompt tuning adds virtual tokens, not weights: there is nothing "
                        "to merge; save the adapter with fastft.save_adapter, or use the model as it is")
    _check_adapter_names(model, adapter_names)
    with warnings.catch_warnings():
        # layers an earlier merge_adapter() merged: peft says "already merged" per layer; the warning below says more
        warnings.filterwarnings("ignore", message="(All adapters are already merged|Already following adapters were "
                                                  "merged)")
        if requantize:
            warnings.simplefilter("ignore", NF4RoundingWarning)  # asked for; the docstring says what it costs
        else:
            layers = [m for m in model.modules() if isinstance(m, (FusedQLoraLinear, NF4IA3Linear))]
            _warn_merged_into_nf4(layers)
            untargeted = [(name, m) for name, m in model.named_modules(remove_duplicate=False)
                          if isinstance(m, NF4Linear) and not name.endswith(".base_layer")]
            dtype = dtype or (compute_dtype(model) if layers or untargeted else None)
            for module in layers:
                module.to_dense(dtype)
            # layers without an adapter come back dense too: a model mixing dense and NF4 layers saves NF4 keys
            # that transformers cannot load (its config has no quantization_config)
            dense = {}  # one dense layer for a layer registered under two names
            for name, module in untargeted:
                if id(module) not in dense:
                    dense[id(module)] = module.to_linear(dtype)
                model.set_submodule(name, dense[id(module)])
        untie_adapted_weights(model)
        return model.merge_and_unload(progressbar=progressbar, safe_merge=safe_merge, adapter_names=adapter_names)


def _check_adapter_names(model: PeftModel, adapter_names) -> None:
    """peft merges nothing for a name no layer holds (and unloads every adapter all the same): refused here."""
    if adapter_names is None:
        return
    if isinstance(adapter_names, str) or not all(isinstance(n, str) for n in adapter_names):
        raise TypeError(f"merge_and_unload: adapter_names={adapter_names!r}; expected a list of adapter names, e.g. "
                        f"{[adapter_names] if isinstance(adapter_names, str) else list(model.peft_config)[:1]}")
    unknown = [n for n in adapter_names if n not in model.peft_config]
    if unknown:
        raise ValueError(f"merge_and_unload: adapter_names entry {unknown[0]!r} is not an adapter of this model; "
                         f"its adapters are {list(model.peft_config)}")


def _warn_merged_into_nf4(layers: list[FusedQLoraLinear]) -> None:
    merged = sorted({name for layer in layers for name in layer.merged_adapters})
    if merged:
        count = sum(bool(layer.merged_adapters) for layer in layers)
        warnings.warn(f"fastft.merge_and_unload: {count} QLoRA layers hold adapter(s) {merged} merged into their NF4 "
                      "weight already (merge_adapter()), a merge that re-quantized W + ΔW: the dense result carries "
                      "that one NF4 rounding, it is not the exact W + ΔW. For the exact merge, call it on a model "
                      "that was never merged (load the NF4 base and the adapter again; unmerge_adapter() would "
                      "re-quantize once more)", NF4RoundingWarning, stacklevel=3)


def save_adapter(model: PeftModel, path: str | os.PathLike, **kwargs) -> Path:
    """`model.save_pretrained(path)` made atomic: written to a temporary sibling, which then takes the folder's place
    as a whole, so an interrupted save leaves the previous save or the new one, never files of both (a config of one
    and the weights of the other would load without an error). Like peft's save, the folder's other files stay
    (other named adapters saved there before, a run's metrics). Folders and files get the modes the umask gives
    (as peft and transformers create them), not mkdtemp's private 0700 (fastft.files.merge_into_folder).
    `is_main_process=False` (peft's multi-process spelling) writes nothing, as peft's save writes nothing there."""
    if not (isinstance(model, PeftModel) or callable(getattr(model, "get_base_model", None))):  # + fastft's own
        raise TypeError(f"save_adapter: model is a {type(model).__name__}, which holds no adapter (it would write the "
                        "whole model); give the model fastft.get_peft_model or fastft.load_adapter returned, or save "
                        "a full model (e.g. after merge_and_unload) with model.save_pretrained(path)")
    check_path(path, "save_adapter")
    if kwargs.get("state_dict") is None and is_sharded(model):  # FSDP2: every rank gathers, rank 0 writes
        kwargs.pop("is_main_process", None)
        kwargs["state_dict"] = gathered_adapter_state(model)
        write_on_rank0(lambda: _save_whole(model, path, kwargs), "save_adapter")  # its error raised on every rank
        return Path(path)
    if not kwargs.get("is_main_process", True):  # peft's multi-process spelling: only the main process writes
        return Path(path)
    return _save_whole(model, path, kwargs)


def _save_whole(model, path, kwargs) -> Path:
    card = Path(path) / "README.md"
    if card.exists() and not card.is_file():  # peft's own save fails there; the swap would replace the folder
        raise IsADirectoryError(f"save_adapter: {card} is not a file, and the save writes its model card there "
                                "(peft's save_pretrained does): rename it, or save the adapter to another folder")

    def write(tmp: Path) -> None:
        if card.is_file():  # peft updates a model card in place, keeping its text: give it the folder's
            shutil.copyfile(card, tmp / "README.md")
        model.save_pretrained(str(tmp), **kwargs)

    with whole_prompt_encoders(model, kwargs.get("state_dict")):  # FSDP2-sharded prompt learning: the whole weights
        return merge_into_folder(path, write, alternatives=(WEIGHTS_NAMES,))  # a stale other format would be read


def patch_peft(model: nn.Module) -> nn.Module:
    """Turn every plain peft LoRA Linear inside `model` into a FusedLoraLinear, in place.

    The state dict, adapters and peft methods are unchanged; outputs are the same up to rounding.
    Returns the model. Raises ValueError if it holds no peft LoRA Linear at all.
    """
    from fastft.integration.methods.dora import fused_class_for

    check_model(model, "patch_peft")
    found = 0
    for module in model.modules():
        if isinstance(module, PeftLoraLinear):
            found += 1
            if type(module) is PeftLoraLinear or (type(module) is FusedLoraLinear and module.lora_magnitude_vector):
                module.__class__ = fused_class_for(module)
    if not found:
        raise ValueError(f"patch_peft: {type(model).__name__} contains no peft LoRA Linear layer "
                         "(build it with peft.get_peft_model(model, LoraConfig(...)) first)")
    return model


def fuse_or_warn(model: nn.Module, layer_type: type, patch, what: str, method: str) -> nn.Module:
    """`patch` (patch_peft, patch_ia3) for a model fastft built or loaded: one whose `method` layers are all
    embeddings, convolutions or Conv1D is valid (peft runs them exactly), so nothing to fuse is a one-line warning,
    not an error. `layer_type`: peft's Linear layer of the method (fastft's fused layers subclass it). Every
    PeftModel fastft returns passes here: its own add_adapter/load_adapter are routed through fastft's."""
    route_adapter_methods(model)
    if any(isinstance(m, layer_type) for m in model.modules()):
        patch(model)
    if not any(isinstance(m, layer_type) and not m.fan_in_fan_out for m in model.modules()):
        warnings.warn(f"fastft.{what}: no {method} layer is fused (none is on a dense or NF4 Linear layer: "
                      "embeddings, convolutions, GPT-2 Conv1D and bitsandbytes 8-bit / FP4 layers run peft's own "
                      "forward)", stacklevel=3)
    return model


def fuse_lora_layers(model: nn.Module, what: str) -> nn.Module:
    return fuse_or_warn(model, PeftLoraLinear, patch_peft, what, "LoRA")
