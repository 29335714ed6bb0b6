"""peft's own model.add_adapter / model.load_adapter on the PeftModels fastft returns.

They go through fastft.add_adapter / fastft.load_adapter (validated; NF4 layers built as QLoRA, which peft alone
cannot: it knows no NF4Linear; every layer fused). Inside a fastft call the PeftModel's methods are peft's own again
(fastft and its method rooms call them), given the peft options the user passed to the routed method.
"""
from __future__ import annotations

import contextlib
import inspect
from contextvars import ContextVar
from pathlib import Path

import peft
from peft import LoraConfig, PeftModel
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from fastft.integration.adapter_files import WEIGHTS_NAMES
from fastft.integration.base_layers import is_peft_model
from fastft.integration.methods.dora import refuse_nf4_dora_merge
from fastft.integration.methods.ia3_nf4 import refuse_nf4_ia3_merge
from fastft.integration.tied_weights import retie_unmerged, untie_adapted_weights

_ADAPTER_CALL: ContextVar = ContextVar("fastft_adapter_call", default=None)


class _AdapterCall:
    def __init__(self, options: dict):
        self.options = options  # peft's add/load options: low_cpu_mem_usage, autocast_adapter_dtype, torch_device...
        self.load_result = None  # what peft's load_adapter returned, for the routed load_adapter to return


@contextlib.contextmanager
def adapter_call(**options):
    """A fastft add/load in progress (a nested one joins it): the PeftModel's methods are peft's own inside."""
    call = _ADAPTER_CALL.get()
    if call is not None:
        yield call
        return
    token = _ADAPTER_CALL.set(_AdapterCall(options))
    try:
        yield _ADAPTER_CALL.get()
    finally:
        _ADAPTER_CALL.reset(token)


def _options(method, *args, **kwargs) -> dict:
    """The options of a call to peft's `method` (all but its first two arguments) by name, positional ones too."""
    signature = inspect.signature(method)
    options = {}
    for name, value in list(signature.bind(*args, **kwargs).arguments.items())[2:]:
        options.update(value if signature.parameters[name].kind is inspect.Parameter.VAR_KEYWORD else {name: value})
    return options


def _accepted(method, options: dict) -> dict:
    params = inspect.signature(method).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return options
    return {k: v for k, v in options.items() if k in params}


def _refuse_unmergeable(model, merge, args, kwargs) -> None:
    """refuse_nf4_dora_merge / refuse_nf4_ia3_merge for peft's merge call `merge(*args, **kwargs)`."""
    adapter_names = inspect.signature(merge).bind(*args, **kwargs).arguments.get("adapter_names")
    refuse_nf4_dora_merge(model, adapter_names)
    refuse_nf4_ia3_merge(model, adapter_names)


class FastftAdapterMethods:
    """Mixed into the class of every PeftModel fastft returns (route_adapter_methods): peft's spelling
    `model.add_adapter(name, config)` / `model.load_adapter(path, name)` works as fastft.add_adapter /
    fastft.load_adapter do; merge_and_unload / merge_adapter first give a layer whose weight is tied to another
    module's its own copy (fastft.integration.tied_weights). Signatures and return values are peft's."""

    def add_adapter(self, adapter_name, peft_config, *args, **kwargs):
        call = _ADAPTER_CALL.get()
        if call is not None:  # fastft's own call inside: peft's, with the user's options
            options = {**_accepted(super().add_adapter, call.options), **kwargs}
            with _undone_on_failure(self, adapter_name):
                return super().add_adapter(adapter_name, peft_config, *args, **options)
        options = _options(super().add_adapter, adapter_name, peft_config, *args, **kwargs)
        if not isinstance(peft_config, (LoraConfig, peft.IA3Config)):  # kinds fastft does not add: peft's rules
            return super().add_adapter(adapter_name, peft_config, **options)
        from fastft.integration.peft_lora import add_adapter  # it imports this module

        with adapter_call(**options):
            add_adapter(self, adapter_name, peft_config)
        return None

    def load_adapter(self, model_id, adapter_name, *args, **kwargs):
        call = _ADAPTER_CALL.get()
        if call is not None:
            call.load_result = super().load_adapter(model_id, adapter_name, *args, **{**call.options, **kwargs})
            return call.load_result
        options = _options(super().load_adapter, model_id, adapter_name, *args, **kwargs)
        is_trainable = options.pop("is_trainable", False)
        hub = {k: options.pop(k) for k in list(options) if k in _HUB_OPTIONS}
        from fastft.integration.peft_lora import load_adapter  # it imports this module

        with adapter_call(**options) as call:
            load_adapter(self, _adapter_folder(model_id, hub), adapter_name, is_trainable=is_trainable)
        return call.load_result

    # PeftModel forwards these to its tuner (__getattr__); peft would merge lm_head's ΔW into the embeddings too.
    # A merge fastft refuses (DoRA into NF4) is refused before any layer changes.
    def merge_and_unload(self, *args, **kwargs):
        _refuse_unmergeable(self, self.base_model.merge_and_unload, args, kwargs)
        untie_adapted_weights(self)
        return self.base_model.merge_and_unload(*args, **kwargs)

    def merge_adapter(self, *args, **kwargs):
        _refuse_unmergeable(self, self.base_model.merge_adapter, args, kwargs)
        retie_unmerged(self)  # layers unmerged behind this class's back (peft's set_adapter unmerges) first
        untie_adapted_weights(self, until_unmerged=True)
        return self.base_model.merge_adapter(*args, **kwargs)

    def unmerge_adapter(self, *args, **kwargs):
        result = self.base_model.unmerge_adapter(*args, **kwargs)
        retie_unmerged(self)
        return result

    def __reduce_ex__(self, protocol):
        # pickled and deep-copied as the plain peft class, routed again when rebuilt: the routed class is made at run
        # time, so it has no name pickle could import
        state = super().__reduce_ex__(2)[2]
        return routed_peft_model, (_peft_class(type(self)),), state


_ROUTED: dict[type, type] = {}


def _peft_class(cls: type) -> type:
    return next(c for c in cls.__mro__ if issubclass(c, PeftModel) and not issubclass(c, FastftAdapterMethods))


def _routed_class(cls: type) -> type:
    """`cls` (a peft PeftModel class) with FastftAdapterMethods first; same name, so type(model).__name__ stays."""
    if cls not in _ROUTED:
        _ROUTED[cls] = type(cls.__name__, (FastftAdapterMethods, cls), {"__module__": __name__,
                                                                         "__qualname__": cls.__qualname__})
    return _ROUTED[cls]


def routed_peft_model(cls: type):
    """An empty instance of peft class `cls`, routed (unpickling and deepcopy fill in its state)."""
    routed = _routed_class(cls)
    return routed.__new__(routed)


def route_adapter_methods(model: nn.Module) -> nn.Module:
    """Route a PeftModel's own add_adapter/load_adapter through fastft's (in place; the class keeps its name)."""
    if is_peft_model(model) and not isinstance(model, FastftAdapterMethods):
        model.__class__ = _routed_class(type(model))
    return model


@contextlib.contextmanager
def _undone_on_failure(model: PeftModel, adapter_name: str):
    """peft's add_adapter, failing partway (a target type it does not support), drops the adapter's config but leaves
    the layers it built so far: their tensors would go into the next save of the other adapters. Removed here."""
    new = adapter_name not in model.peft_config
    try:
        yield
    except Exception:
        if new and adapter_name not in model.peft_config:
            for module in model.modules():
                if isinstance(module, BaseTunerLayer) and any(adapter_name in getattr(module, name, {})
                                                              for name in module.adapter_layer_names):
                    module.delete_adapter(adapter_name)
        raise


def _hub_options() -> frozenset:
    from huggingface_hub import hf_hub_download

    return frozenset(inspect.signature(hf_hub_download).parameters) | {"use_auth_token"}  # peft's split


_HUB_OPTIONS = _hub_options()


def _adapter_folder(model_id, hub: dict) -> Path:
    """The folder of a saved adapter: `model_id` (its `subfolder`) when it exists here, else the Hub repo's files
    downloaded as peft downloads them (adapter_config.json and the weights), with the same options."""
    local = Path(model_id, hub.get("subfolder") or "")
    if local.exists() or not _looks_like_repo_id(str(model_id)):
        return local  # fastft.load_adapter names what is missing
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    hub = dict(hub)
    if "use_auth_token" in hub:
        hub["token"] = hub.pop("use_auth_token")
    config = Path(hf_hub_download(str(model_id), "adapter_config.json", **hub))
    for name in WEIGHTS_NAMES:  # peft's order: safetensors, else .bin
        try:
            hf_hub_download(str(model_id), name, **hub)
            break
        except EntryNotFoundError:
            continue
    return config.parent


def _looks_like_repo_id(name: str) -> bool:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True
