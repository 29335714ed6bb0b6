"""Injecting bottleneck adapters into a transformers model, and their save format.

`get_adapter_model(model, config)` freezes the model, wraps every matching output projection in `AdapterAfter`
and returns a `BottleneckAdapterModel` (a thin wrapper like peft's PeftModel: forward, attribute access and
`generate` go to the model; `save_pretrained` writes the adapter). Saved as `adapter_config.json` (the config
with peft_type "FASTFT_BOTTLENECK_ADAPTER") and `adapter_model.safetensors` (the adapter tensors and those of the
modules trained whole, modules_to_save / the task's head, keyed by module path), both written into a temporary
folder that then takes the folder's place (fastft.files.merge_into_folder). `load_bottleneck_adapter` checks every
tensor against the model before loading.

The wrapper is a peft PeftModel to code that asks (isinstance), as transformers' Trainer does: it saves a
checkpoint with the model's `save_pretrained` (this adapter format) only for a PreTrainedModel or a PeftModel, else
the whole model's state dict (which safetensors refuses for tied embeddings), and resume_from_checkpoint /
load_best_model_at_end reload a PeftModel's checkpoint with `load_adapter(checkpoint, "default", is_trainable=)`.
peft's own __init__ is not run, but the layout is peft's: `base_model` is a tuner module (BottleneckAdapterTuner, as
peft's LoraModel) whose `.model` is the transformers model, so state-dict keys read `base_model.model.<key>` and code
that reads a PeftModel's `base_model.model` (Trainer's label smoothing and NEFTune) finds the transformers model.
The peft methods that would manage several adapters are refused. fastft's own functions tell it from peft's models
(fastft.integration.base_layers.is_peft_model).
"""
from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import json
from pathlib import Path

import torch
from peft import PeftModel
from torch import nn

from fastft.files import merge_into_folder
from fastft.integration.base_layers import attribute_set, in_out_features
from fastft.integration.lora_config import refuse_nf4_trained_whole
from fastft.integration.module_names import names_module
from fastft.integration.methods.adapter.config import PEFT_TYPE, BottleneckAdapterConfig
from fastft.integration.methods.adapter.layer import AdapterAfter, BottleneckAdapter

CONFIG_NAME, WEIGHTS_NAME = "adapter_config.json", "adapter_model.safetensors"
PREFIX = "base_model.model."  # of the wrapper's state-dict keys, before the transformers model's own


class BottleneckAdapterTuner(nn.Module):
    """The wrapper's `base_model`, in the place of peft's tuner (BaseTuner, e.g. LoraModel): `.model` is the
    transformers model, calls and unknown attributes go to it. Code written for peft's layout (transformers'
    Trainer reads `peft_model.base_model.model`) finds the transformers model where it looks."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":  # not set up yet (unpickling): no endless recursion
                raise
            return getattr(self.model, name)


class BottleneckAdapterModel(PeftModel):
    """The model with bottleneck adapters; only the adapters train (and the modules trained whole: modules_to_save,
    the task's head). A PeftModel subclass for transformers' Trainer (module docstring); it holds one adapter,
    "default"."""

    def __init__(self, model: nn.Module, config: BottleneckAdapterConfig, heads: list[tuple[str, nn.Module]] = ()):
        nn.Module.__init__(self)  # not peft's __init__: peft would build its own tuner
        self.base_model = BottleneckAdapterTuner(model)
        self.adapter_config = config
        # (name, a frozen copy of the module as it was) of each module trained whole: what disable_adapter runs (a
        # plain list: not a submodule, so neither in the state dict nor among the parameters)
        self._original_heads = list(heads)
        if type(self) is BottleneckAdapterModel:
            self.__class__ = _with_forward_signature(type(model))

    def forward(self, *args, **kwargs):
        return self.base_model(*args, **kwargs)

    def __reduce_ex__(self, protocol):
        # pickled with the base model's class, from which the class with its forward signature is made again
        return _rebuilt, (type(self.get_base_model()),), super().__reduce_ex__(2)[2]

    def generate(self, *args, **kwargs):
        return self.get_base_model().generate(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("base_model"), name)

    def get_base_model(self) -> nn.Module:
        """The transformers model (peft's spelling; `base_model` is the tuner around it)."""
        return self.base_model.model

    # what peft's PeftModel reads from its tuner, and transformers' Trainer from a PeftModel
    @property
    def peft_config(self) -> dict[str, BottleneckAdapterConfig]:
        return {"default": self.adapter_config}

    @property
    def active_adapter(self) -> str:
        return "default"

    @property
    def active_adapters(self) -> list[str]:
        return ["default"]

    def load_adapter(self, model_id, adapter_name: str = "default", is_trainable: bool = False, **kwargs) -> None:
        """peft's reload of a saved adapter's weights into the model's adapter, as transformers' Trainer calls it
        (resume_from_checkpoint with is_trainable=True, load_best_model_at_end): the folder must hold a bottleneck
        adapter of this model's config, every tensor the model's adapter has and no other, each of its shape; all
        is checked before a value is copied (in place: an optimizer keeps its parameters). As peft's: is_trainable
        makes the adapter's parameters trainable, else the model goes to eval mode."""
        from fastft.files import one_version
        from fastft.integration.adapter_files import read_weights

        if adapter_name != "default" or kwargs:
            raise ValueError(f"load_adapter: a {type(self).__name__} holds one adapter, 'default', and takes no extra "
                             f"options; got adapter_name={adapter_name!r}"
                             + (f" and {sorted(kwargs)}" if kwargs else "") + "; to load a bottleneck adapter onto "
                             "another model use fastft.load_adapter(base_model, path)")
        with one_version(model_id) as path:  # the config and weights of one save
            for f in (path / CONFIG_NAME, path / WEIGHTS_NAME):
                if not f.is_file():
                    raise FileNotFoundError(f"load_adapter: {Path(model_id) / f.name} not found (expected a fastft "
                                            "bottleneck adapter directory)")
            if not is_bottleneck_adapter(path):
                raise ValueError(f"load_adapter: {Path(model_id) / CONFIG_NAME} does not describe a fastft "
                                 "bottleneck adapter; its weights cannot be loaded into this model's adapter")
            saved = BottleneckAdapterConfig.from_dict(json.loads((path / CONFIG_NAME).read_text())).to_dict()
            have = self.adapter_config.to_dict()
            differ = sorted(k for k in have.keys() | saved.keys() if have.get(k) != saved.get(k))
            if differ:
                raise ValueError(f"load_adapter: {model_id} holds a bottleneck adapter with "
                                 + ", ".join(f"{k}={saved.get(k)!r}" for k in differ) + ", but the model's adapter "
                                 "has " + ", ".join(f"{k}={have.get(k)!r}" for k in differ) + ": its weights "
                                 "cannot be loaded into it")
            loaded = read_weights(path / WEIGHTS_NAME)
        _check_fits(loaded, {k: tuple(v.shape) for k, v in self.adapter_state_dict().items()}, model_id,
                    type(self.get_base_model()).__name__)
        self.get_base_model().load_state_dict(loaded, strict=False)
        if is_trainable:
            for name, p in self.get_base_model().named_parameters():
                if self._saved(name):
                    p.requires_grad_(True)
        else:
            self.eval()

    @classmethod
    def from_pretrained(cls, model: nn.Module, model_id, adapter_name: str = "default", is_trainable: bool = False,
                        **kwargs) -> BottleneckAdapterModel:
        """peft's PeftModel.from_pretrained for a saved bottleneck adapter: fastft.load_adapter."""
        if kwargs:
            raise ValueError(f"from_pretrained: bottleneck adapters take no extra options, got {sorted(kwargs)}")
        from fastft.integration.peft_lora import load_adapter

        if not is_bottleneck_adapter(model_id):
            raise ValueError(f"from_pretrained: {Path(model_id) / CONFIG_NAME} does not describe a fastft bottleneck "
                             "adapter (load other adapters with fastft.load_adapter or peft's PeftModel)")
        return load_adapter(model, model_id, adapter_name=adapter_name, is_trainable=is_trainable)

    def add_adapter(self, adapter_name: str, *args, **kwargs):
        raise TypeError(f"add_adapter: a {type(self).__name__} holds one adapter, 'default'; a second bottleneck "
                        "adapter (or another method's) needs a model of its own")

    def set_adapter(self, adapter_name: str, *args, **kwargs) -> None:
        if adapter_name != "default":
            raise ValueError(f"set_adapter: a {type(self).__name__} holds one adapter, 'default', not "
                             f"{adapter_name!r}")

    def delete_adapter(self, adapter_name: str) -> None:
        raise TypeError(f"delete_adapter: a {type(self).__name__} holds one adapter, 'default'; use "
                        "get_base_model() for the model without it")

    @contextlib.contextmanager
    def disable_adapter(self):
        """The base model alone inside the block (peft's PeftModel.disable_adapter): DPO's reference. Modules trained
        whole (modules_to_save) are their original copies there, as in peft."""
        model = self.get_base_model()
        trained = [(name, model.get_submodule(name)) for name, _ in self._original_heads]
        with attribute_set((m for m in model.modules() if isinstance(m, AdapterAfter)), "disabled", True):
            try:
                for (name, original), (_, head) in zip(self._original_heads, trained):
                    like = next(head.parameters(), None)  # where the model was moved since: the copy goes along
                    _set_module(model, name, original if like is None else
                                original.to(device=like.device, dtype=like.dtype))
                yield
            finally:
                for name, head in trained:
                    _set_module(model, name, head)

    def _saved(self, key: str) -> bool:
        """Whether a key of the transformers model's state dict is saved with the adapter."""
        return ".adapter." in key or any(key.startswith(name + ".") for name, _ in self._original_heads)

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """The saved tensors, keyed as in the transformers model's state dict (the adapter file's keys)."""
        return {k: v.detach() for k, v in self.get_base_model().state_dict().items() if self._saved(k)}

    def _saved_part(self, given: dict) -> dict:
        """The saved tensors of `given` (keyed as the transformers model's state dict), each of them there: a key
        missing from `given` takes the tensor of a key tied to it (a list of parameters names a tied weight once:
        lm_head trained whole under tied embeddings is given as embed_tokens.weight)."""
        own = self.get_base_model().state_dict(keep_vars=True)
        name_of = {id(own[k]): k for k in given if k in own}
        saved = {k: given[k] if k in given else given.get(name_of.get(id(v))) for k, v in own.items() if self._saved(k)}
        _check_saved_keys({k: v for k, v in saved.items() if v is not None} | {
            k: v for k, v in given.items() if k not in own and self._saved(k)}, set(saved))
        return saved

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return trainable, sum(p.numel() for p in self.parameters())

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || "
              f"trainable%: {100 * trainable / total:.4f}")

    def save_pretrained(self, path, state_dict: dict | None = None, **kwargs) -> None:
        """Writes the adapter; `state_dict`: this wrapper's weights gathered elsewhere (e.g. from FSDP2 shards,
        keys as in `self.named_parameters()`: `base_model.model.<key>`), of which the adapter tensors are saved under
        the transformers model's keys. `is_main_process=False` (peft's and transformers' Trainer's multi-process
        spelling) writes nothing."""
        from safetensors.torch import save_file

        if not kwargs.get("is_main_process", True):
            return

        if state_dict is None:
            state_dict = self.adapter_state_dict()
        else:
            state_dict = self._saved_part({k.removeprefix(PREFIX): v for k, v in state_dict.items()})
        tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
        text = json.dumps(self.adapter_config.to_dict(), indent=2, sort_keys=True)

        def write(tmp: Path) -> None:
            save_file(tensors, tmp / WEIGHTS_NAME, metadata={"format": "pt"})
            (tmp / CONFIG_NAME).write_text(text)

        merge_into_folder(path, write)  # both files, or neither: weights under another save's config load silently


def _check_saved_keys(given: dict, expected: set[str]) -> None:
    """A state dict handed to save_pretrained holds every adapter tensor under the wrapper's names, and no other:
    one keyed otherwise (the transformers model's own keys, the old wrapper's `base_model.<key>`) would be saved
    under names no load finds, or leave tensors out."""
    missing, extra = sorted(expected - given.keys()), sorted(given.keys() - expected)
    if missing or extra:
        what = " and ".join(([f"lacks {len(missing)} adapter tensor(s) ({missing[0]!r}, ...)"] if missing else []) +
                            ([f"holds {len(extra)} adapter-like tensor(s) under names the model has not ({extra[0]!r}, "
                              "...)"] if extra else []))
        raise ValueError(f"save_pretrained: the given state_dict {what}; give the wrapper's own state dict, keys "
                         f"'{PREFIX}<key>' as in its named_parameters() (or no state_dict)")


@functools.lru_cache(maxsize=None)
def _with_forward_signature(base_class: type) -> type:
    """BottleneckAdapterModel whose forward shows `base_class.forward`'s signature: transformers' Trainer reads it
    (and the class's, for its label names) to keep the dataset columns the model takes; `(*args, **kwargs)` lost
    input_ids and labels ("The batch received was empty"). peft's PeftModel gets the same from its base model."""
    def forward(self, *args, **kwargs):
        return self.base_model(*args, **kwargs)

    try:
        forward.__signature__ = inspect.signature(base_class.forward)
    except (TypeError, ValueError):  # no signature to show: the plain class
        return BottleneckAdapterModel
    forward.__qualname__ = "BottleneckAdapterModel.forward"
    return type("BottleneckAdapterModel", (BottleneckAdapterModel,), {"forward": forward, "__module__": __name__})


def _rebuilt(base_class: type) -> BottleneckAdapterModel:
    return nn.Module.__new__(_with_forward_signature(base_class))


def _targets(model: nn.Module, config: BottleneckAdapterConfig) -> list[tuple[str, nn.Module, int]]:
    """(name, layer, out_features) of every output projection `config` puts an adapter after; errors name the
    field."""
    if any(isinstance(m, AdapterAfter) for m in model.modules()):
        raise ValueError(f"{type(model).__name__} already has bottleneck adapters")
    module_names = [n for n, _ in model.named_modules() if n]
    names = []
    for field in config.target_fields():  # each field must place adapters: one that matches nothing is a typo
        matched = [n for n in module_names if config.matches(field, n)]
        if not matched:
            raise ValueError(f"BottleneckAdapterConfig.{field}={getattr(config, field)!r} matches no module of "
                             f"{type(model).__name__} (tuple entries: a module name or a dotted suffix of one; a "
                             "string: a regex the whole name must match)")
        taken = sorted(set(matched) & set(names))
        if taken:
            raise ValueError(f"BottleneckAdapterConfig.{field} also matches {taken[:3]}, which attn_output_modules "
                             "matches: one module would get two adapters; make the two fields match apart (e.g. a "
                             "dotted suffix or a regex)")
        if field == "mlp_output_modules" and not isinstance(config.mlp_output_modules, str):
            _refuse_mixtures_of_experts(model, matched)
        names += matched
    names = [n for n in module_names if n in set(names)]  # the model's order
    return [(name, model.get_submodule(name), _output_width(name, model.get_submodule(name))) for name in names]


def _heads(model: nn.Module, config: BottleneckAdapterConfig, targets) -> list[tuple[str, nn.Module]]:
    """(name, module) of every module trained whole: each modules_to_save entry must name one (a typo would leave it
    frozen); the task's heads where the model has them. None may hold an adapter target (two owners)."""
    modules = [(n, m) for n, m in model.named_modules() if n]
    entries, task_heads = config.heads_to_save()
    names = []
    for entry in entries:
        matched = [n for n, _ in modules if names_module(entry, n)]
        if not matched:
            raise ValueError(f"BottleneckAdapterConfig.modules_to_save entry {entry!r} matches no module of "
                             f"{type(model).__name__} (a module name or a dotted suffix of one)")
        names += matched
    names += [n for n, _ in modules if any(names_module(head, n) for head in task_heads)]
    names = [n for n in dict.fromkeys(names) if not any(n.startswith(other + ".") for other in names)]  # outermost
    for name in names:
        inside = [t for t, _, _ in targets if t == name or t.startswith(name + ".") or name.startswith(t + ".")]
        if inside:
            raise ValueError(f"BottleneckAdapterConfig.modules_to_save: '{name}' holds or is inside the adapter "
                             f"target '{inside[0]}'; train whole modules apart from the adapted layers")
        entry = next((e for e in entries if names_module(e, name)), None)
        refuse_nf4_trained_whole("BottleneckAdapterConfig", entry or name.rsplit(".", 1)[-1], name,
                                 model.get_submodule(name), None if entry else config.task_type)
    return [(name, model.get_submodule(name)) for name in names]


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def _refuse_mixtures_of_experts(model: nn.Module, matched: list[str]) -> None:
    """An adapter "after the MLP" follows the MLP's output projection; a mixture-of-experts block (transformers names
    its experts `experts`) has none: the names would match a layer inside it (a shared expert's down_proj, whose
    output the block still gates and adds to the routed experts') or nothing, leaving the layer without an adapter.
    A regex string places adapters exactly where it says, inside a block too."""
    for block, module in model.named_modules():
        if not block or not hasattr(module, "experts") or not isinstance(module.experts, nn.Module):
            continue
        inside = [n for n in matched if n.startswith(block + ".")]
        where = f"they match {inside[0]!r} inside it" if inside else "they match nothing in it"
        raise ValueError(f"BottleneckAdapterConfig.mlp_output_modules: {block!r} ({type(module).__name__}) is a "
                         f"mixture of experts, whose output is no single linear layer an adapter could follow ({where}"
                         "); fastft's bottleneck adapters follow dense MLPs (to place them inside the experts' block "
                         "on purpose, give a regex string)")


def _output_width(name: str, layer: nn.Module) -> int:
    """The width of `layer`'s output, which the adapter reads and writes: out_features of a linear layer (nn.Linear,
    NF4Linear, or any layer naming it so), nf of transformers' Conv1D (GPT-2's c_proj)."""
    shape = in_out_features(layer)
    features = shape[1] if shape is not None else getattr(layer, "out_features", None)
    if not isinstance(features, int) or isinstance(features, bool):
        raise ValueError(f"bottleneck adapter target '{name}' ({type(layer).__name__}) is not a linear layer (no "
                         "out_features): name the sublayer's output projection (nn.Linear or transformers' Conv1D)")
    return features


def get_adapter_model(model: nn.Module, config: BottleneckAdapterConfig, adapter_name: str = "default",
                      **kwargs) -> BottleneckAdapterModel:
    if not isinstance(config, BottleneckAdapterConfig):
        raise TypeError(f"get_adapter_model expects a fastft BottleneckAdapterConfig, got {type(config).__name__}")
    if adapter_name != "default" or kwargs:
        raise ValueError("bottleneck adapters support one adapter named 'default' and no extra options")
    config.validate()
    targets = _targets(model, config)
    heads = _heads(model, config, targets)
    for p in model.parameters():
        p.requires_grad_(False)
    originals = [(name, copy.deepcopy(head)) for name, head in heads]  # frozen: what disable_adapter runs
    for name, base, features in targets:
        device = next((t.device for t in base.parameters()), None)
        adapter = BottleneckAdapter(features, config.size, config.activation, config.init_std, device=device)
        _set_module(model, name, AdapterAfter(base, adapter))
    for _, head in heads:
        head.requires_grad_(True)
    if config.inference_mode:
        for p in model.parameters():
            p.requires_grad_(False)
    return BottleneckAdapterModel(model, config, originals)


def is_bottleneck_adapter(path) -> bool:
    config_file = Path(path) / CONFIG_NAME
    if not config_file.is_file():
        return False
    try:
        return json.loads(config_file.read_text()).get("peft_type") == PEFT_TYPE
    except (json.JSONDecodeError, AttributeError):
        return False


def _check_fits(loaded: dict, need: dict[str, tuple], path, model_name: str) -> None:
    """The loaded tensors are exactly the adapter tensors `need` names, each of the shape it gives."""
    if loaded.keys() != need.keys():
        missing, extra = sorted(need.keys() - loaded.keys())[:3], sorted(loaded.keys() - need.keys())[:3]
        raise ValueError(f"load_adapter: {path} does not fit {model_name}: missing {missing}, unexpected {extra}")
    for key, t in loaded.items():
        if tuple(t.shape) != need[key]:
            raise ValueError(f"load_adapter: '{key}' in {path} has shape {tuple(t.shape)}, but the model needs "
                             f"{need[key]}: the adapter was trained for a different model")


def load_bottleneck_adapter(model: nn.Module, path, adapter_name: str = "default",
                            is_trainable: bool = False) -> BottleneckAdapterModel:
    """Rebuild the adapters described in `path` on `model` (a plain transformers model) and load their weights.
    The file is read and checked against the model first: a load that fails leaves `model` as it was."""
    from fastft.integration.adapter_files import read_weights

    path = Path(path)
    for f in (path / CONFIG_NAME, path / WEIGHTS_NAME):
        if not f.is_file():
            raise FileNotFoundError(f"load_adapter: {f} not found (expected a fastft bottleneck adapter directory)")
    if isinstance(model, PeftModel) or not isinstance(model, nn.Module):  # BottleneckAdapterModel too
        raise TypeError(f"load_adapter: bottleneck adapters load into a plain transformers model, not a "
                        f"{type(model).__name__}; give it the base model (a fresh one, or the base after unload())")
    config = BottleneckAdapterConfig.from_dict(json.loads((path / CONFIG_NAME).read_text()))
    config.inference_mode = not is_trainable
    need = {}
    targets = _targets(model, config)
    for name, _, features in targets:  # the tensors the adapters will have, sized on no device
        adapter = BottleneckAdapter(features, config.size, config.activation, config.init_std, device="meta")
        need.update({f"{name}.adapter.{k}": tuple(v.shape) for k, v in adapter.state_dict().items()})
    for name, head in _heads(model, config, targets):  # modules trained whole: saved as they were
        need.update({f"{name}.{k}": tuple(v.shape) for k, v in head.state_dict().items()})
    loaded = read_weights(path / WEIGHTS_NAME)
    _check_fits(loaded, need, path, type(model).__name__)
    wrapped = get_adapter_model(model, config, adapter_name)
    wrapped.get_base_model().load_state_dict(loaded, strict=False)
    if not is_trainable:
        wrapped.eval()
    return wrapped
