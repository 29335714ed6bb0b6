"""`patch_model` / `unpatch_model`: one function reading the table in fastft.integration.patching.table.

Patching swaps classes of module *instances* (never transformers' classes or code): each RMSNorm, gated MLP,
attention and the *ForCausalLM get a subclass of their own class (same name, so saving, `isinstance` and
`config.architectures` are unaffected) whose forward is fastft's:

- RMSNorm → fastft.ops.rms_norm (Llama or Gemma flavour, the model's rounding);
- MLP → the model's own projections (plain, LoRA or NF4 layers stay as they are; gate and up, or one fused
  gate_up) around fastft.ops.swiglu/geglu; a sparse MoE block stays the model's own;
- attention → the model's own forward code with RoPE through fastft.ops.rope (see rope_binding), and
  `attn_implementation="fastft"` (fastft.integration.attention) unless the architecture's attention logit
  softcapping is set (Gemma2's default), the config has attention dropout (fastft attention has neither) or a
  head size fastft attention does not take (ops.attention.head_dim_supported);
- *ForCausalLM → in training mode with labels, the loss through fastft.ops.lm_head_cross_entropy (see causal_lm):
  no logits (final softcapping, logits scaling and a MoE router's load-balancing loss as the model's own head
  applies them); in eval mode (Trainer.evaluate / predict) the model's own logits and loss.

Everything is checked before anything changes: an unsupported architecture, activation or an already patched
model raises and leaves the model as it was. `unpatch_model` restores the classes and the attention setting
exactly; nothing module-level changes, so unpatched models in the same process are never affected. Works on a
transformers model or a peft PeftModel around one, before or after `fastft.get_peft_model` (LoRA layers are
children of the swapped modules and are not touched). While patched, the model does not pickle (its classes
are made at run time); unpatch it first, or save its state dict / adapters as usual.
"""
from __future__ import annotations

import contextlib
import importlib
import types
from dataclasses import dataclass, field

from torch import nn
from transformers.activations import ACT2FN

from fastft.arguments import check_flag, check_model
from fastft.integration.patching import rope_binding
from fastft.integration.patching.causal_lm import FusedLossCausalLMForward, forward_with_signature
from fastft.integration.patching.table import ARCHITECTURES, GELU_TANH, Architecture
from fastft.modules.fused_layers import FusedGLUMLPForward, FusedRMSNormForward, with_saved_inputs_made_again
from fastft.ops.attention import MAX_HEAD_DIM, head_dim_supported
from fastft.ops.shared import BACKENDS, bound_to, require_triton

_SUBCLASSES: dict[tuple, type] = {}


@dataclass
class PatchRecord:
    """What patch_model changed, so unpatch_model can put it back (kept on the model as `_fastft_patch`)."""
    arch: Architecture
    swapped: list = field(default_factory=list)  # (module, original class)
    attn_implementation: str | None = None  # the original, when it was changed
    summary: dict = field(default_factory=dict)


def supported_architectures() -> list[str]:
    return sorted(ARCHITECTURES)


def _transformers_model(model: nn.Module) -> nn.Module:
    """The transformers model inside a peft PeftModel (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) and hasattr(model, "peft_config") else model


def _subclass(cls: type, mixin: type | None, **attrs) -> type:
    """cls with `mixin`'s forward in front (or `attrs` alone), same name; one per (cls, mixin, attrs)."""
    key = (cls, mixin, tuple(sorted(attrs.items(), key=lambda kv: kv[0])))
    if key not in _SUBCLASSES:
        bases = (mixin, cls) if mixin is not None else (cls,)
        _SUBCLASSES[key] = type(cls.__name__, bases, {"__module__": cls.__module__, "__qualname__": cls.__qualname__,
                                                      "_fastft_original_class": cls, "__reduce_ex__": _reduce_patched,
                                                      **attrs})
    return _SUBCLASSES[key]


class _PatchedClass:
    """A patched class inside a module's reduction: deep-copied as itself (copy.deepcopy of a patched model works),
    refused by pickle with what to do (pickle looks a class up by its name, which names transformers' own class)."""

    def __init__(self, cls: type):
        self.cls = cls

    def __deepcopy__(self, memo):
        return self

    def __reduce__(self):
        raise TypeError(f"fastft: cannot pickle a patched model (its {self.cls.__name__} is fastft's subclass made at "
                        "run time): fastft.unpatch_model(model) before torch.save / pickle and patch_model again after "
                        "loading, or save the weights (save_pretrained, state_dict)")


def _new_patched(patched: _PatchedClass, *args):
    return patched.cls.__new__(patched.cls, *args)


def _reduce_patched(self, protocol):
    reduced = list(object.__reduce_ex__(self, max(protocol, 2)))  # (copyreg.__newobj__, (cls, *args), state, ...)
    reduced[0], reduced[1] = _new_patched, (_PatchedClass(type(self)), *reduced[1][1:])
    return tuple(reduced)


def _swap_class(module: nn.Module, new_cls: type) -> None:
    """module.__class__ = new_cls, and the forwards bound on the instance follow: accelerate's hooks (cpu_offload,
    dispatch_model) keep the forward they wrap as `_old_forward` (and put it back as `forward` when removed), a
    method bound to the class at that time. Left bound to the other class, a patched forward would run on the
    unpatched module (a crash: its class attributes are gone), or the original one on a patched module (nothing
    fused, the summary saying otherwise)."""
    old_forward = type(module).forward
    for name in ("_old_forward", "forward"):
        if bound_to(module.__dict__.get(name), module, old_forward):
            module.__dict__[name] = types.MethodType(new_cls.forward, module)
    module.__class__ = new_cls


def original_class(module: nn.Module) -> type:
    """The transformers class behind a module patch_model made (the module's own class otherwise)."""
    return getattr(type(module), "_fastft_original_class", type(module))


def _fail(model: nn.Module, message: str) -> ValueError:
    return ValueError(f"fastft.patch_model({type(model).__name__}): {message}")


def _arch_of_class(base: nn.Module):
    """The table's architecture whose causal-LM class `base` is, for a model type outside the table that transformers
    builds from it (EXAONE, InternLM3, IQuestCoder are LlamaForCausalLM); None otherwise."""
    cls = original_class(base)
    return next((arch for arch in ARCHITECTURES.values()
                 if cls.__module__ == arch.module and cls.__name__ == arch.causal_lm), None)


def unsupported_config(config) -> str | None:
    """patch_model's architecture check on a model's config alone, before its weights load: why it would refuse, or
    None where the table has the model type or transformers builds one of the table's classes for it (or the class
    cannot be told without the model: remote code)."""
    if getattr(config, "model_type", None) in ARCHITECTURES:
        return None
    from transformers import AutoModelForCausalLM

    try:
        cls = AutoModelForCausalLM._model_mapping[type(config)]
    except (KeyError, ValueError):
        return None
    if any(cls.__module__ == arch.module and cls.__name__ == arch.causal_lm for arch in ARCHITECTURES.values()):
        return None
    return (f"architecture {config.model_type!r} is not supported; supported model types: "
            f"{', '.join(supported_architectures())}")


def _plan(base: nn.Module, backend: str, attention: bool, loss: bool = True):
    """(arch, [(module, new class)], attention change or None, summary): checks everything, changes nothing."""
    config = getattr(base, "config", None)
    model_type = getattr(config, "model_type", None)
    arch = ARCHITECTURES.get(model_type) or _arch_of_class(base)
    if arch is None:
        raise _fail(base, f"architecture {model_type!r} is not supported; supported model types: "
                          f"{', '.join(supported_architectures())}")
    if getattr(base, "_fastft_patch", None) is not None:
        raise _fail(base, "the model is already patched (call fastft.unpatch_model first)")
    modeling = importlib.import_module(arch.module)
    roles = [role for role in ("norm", "mlp", "attention", "causal_lm") if getattr(arch, role) is not None
             and (loss or role != "causal_lm")]
    classes = {}
    for role in roles:
        name = getattr(arch, role)
        cls = getattr(modeling, name, None)
        if cls is None:
            raise _fail(base, f"{arch.module} has no class {name}: this transformers version is not one fastft's "
                              "patch table knows")
        classes[role] = cls
    if arch.router_aux_loss is not None and not callable(getattr(modeling, arch.router_aux_loss, None)):
        raise _fail(base, f"{arch.module} has no function {arch.router_aux_loss}: this transformers version is not "
                          "one fastft's patch table knows")
    if not rope_binding.calls_rope(classes["attention"]):
        raise _fail(base, f"{arch.attention}.forward does not call {rope_binding.ROPE_NAME}: this transformers "
                          "version is not one fastft's patch table knows")
    activation = getattr(config, arch.activation_attr, None)
    if "mlp" in classes and activation not in GELU_TANH:
        raise _fail(base, f"MLP activation config.{arch.activation_attr}={activation!r} has no fused GLU; supported: "
                          f"{sorted(GELU_TANH)}")
    # where the MLP modules keep their activation module (`act_fn`; Phi-3's `activation_fn`): the fused MLP checks it
    mlp = next((m for m in base.modules() if isinstance(m, classes.get("mlp", ()))), None)
    act_attr = "act_fn" if mlp is None else next((a for a in ("act_fn", "activation_fn") if a in mlp._modules), None)
    if act_attr is None:  # the fused MLP would fall back at every call, the summary saying fused
        raise _fail(base, f"{arch.mlp} keeps its activation under no name fastft knows (act_fn, activation_fn): this "
                          "transformers version is not one fastft's patch table knows")

    attrs = {"norm": dict(_fastft_offset=arch.norm_offset, _fastft_cast=arch.norm_cast,
                          _fastft_eps_attr=arch.norm_eps_attr, _fastft_backend=backend),
             "mlp": dict(_fastft_gelu=GELU_TANH.get(activation), _fastft_gate_up=arch.fused_gate_up,
                         _fastft_act_type=type(ACT2FN[activation]) if activation in GELU_TANH else None,
                         _fastft_act_attr=act_attr, _fastft_backend=backend),
             "attention": dict(forward=with_saved_inputs_made_again(
                 rope_binding.forward_with_fastft_rope(classes["attention"], backend, arch.partial_rotary)))}
    if "causal_lm" in classes:  # not with loss=False
        attrs["causal_lm"] = dict(_fastft_softcap_attr=arch.final_softcap_attr,
                                  _fastft_logits_scaling_attr=arch.logits_scaling_attr,
                                  _fastft_router_aux_loss=arch.router_aux_loss, _fastft_backend=backend,
                                  forward=forward_with_signature(classes["causal_lm"]))
    mixins = {"norm": FusedRMSNormForward, "mlp": FusedGLUMLPForward, "attention": None,
              "causal_lm": FusedLossCausalLMForward}
    swaps, counts = [], dict.fromkeys(classes, 0)
    for name, module in base.named_modules():
        for role, cls in classes.items():
            if isinstance(module, cls):
                # a copy of a module patched before (peft's modules_to_save deep-copies it) is patched afresh
                if original_class(module) is not cls:
                    raise _fail(base, f"module '{name or '<root>'}' is a {type(module).__qualname__}, a subclass of "
                                      f"{cls.__name__} fastft does not know (patched already?)")
                swaps.append((module, _subclass(cls, mixins[role], **attrs[role])))
                counts[role] += 1
    missing = [getattr(arch, role) for role in ("norm", "mlp", "attention") if role in counts and counts[role] == 0]
    if missing:
        raise _fail(base, f"found no {', '.join(missing)} module to patch; nothing was changed")

    attn_change = None
    softcap = getattr(config, arch.attention_softcap_attr, None) if arch.attention_softcap_attr else None
    dropout = getattr(config, "attention_dropout", 0.0) or 0.0
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if not attention:
        attention_note = f"kept {config._attn_implementation!r} (attention=False)"
    elif softcap is not None:
        attention_note = f"kept {config._attn_implementation!r}: attention logit softcapping {softcap}"
    elif dropout:
        attention_note = f"kept {config._attn_implementation!r}: attention dropout {dropout}"
    elif not head_dim_supported(head_dim):
        attention_note = f"kept {config._attn_implementation!r}: head_dim {head_dim} (fastft attention takes " \
                         f"multiples of 8 in [16, {MAX_HEAD_DIM}])"
    else:
        attn_change = config._attn_implementation
        attention_note = "fastft"
    summary = {"model_type": model_type, "rms_norm": counts["norm"], "glu_mlp": counts.get("mlp", 0),
               "rope_attention": counts["attention"], "fused_loss": counts.get("causal_lm", 0) > 0,
               "attention": attention_note, "backend": backend}
    return arch, swaps, attn_change, summary


def patch_model(model: nn.Module, *, backend: str = "auto", attention: bool = True, loss: bool = True) -> nn.Module:
    """Route a supported transformers causal LM (or a PeftModel around one) through fastft's kernels, in place.

    backend: for the layer ops and the fused loss ("auto": Triton on CUDA, torch elsewhere; "triton"; "torch"). The
    fused attention keeps its own setting (fastft.register_attention(backend)), the LoRA layers theirs
    (FASTFT_LORA_BACKEND).
    attention: switch to attn_implementation="fastft" where the architecture allows it (see the module docstring).
    loss: the fused lm_head loss in training mode (logits None). False keeps the model's own head and loss, for a
    trainer that reads the logits with labels given (TRL's SFTTrainer up to 1.9 computes its token accuracy and
    entropy from them; 1.10-1.14 with loss_type "nll" or "dft"); the layer kernels stay.
    Returns the model. The record of the changes (and a summary) is `model._fastft_patch` on the transformers
    model. In training mode with labels the patched forward returns logits=None (the fused loss); not in training
    mode it returns the model's own logits and loss (`skip_logits=True` / `False` on a call overrides that).
    """
    if backend not in BACKENDS:
        raise ValueError(f"fastft.patch_model: `backend` must be one of {BACKENDS}, got {backend!r}")
    if backend == "triton":
        require_triton("fastft.patch_model: backend='triton'", "backend='auto' or 'torch' runs without it")
    check_model(model, "fastft.patch_model")
    check_flag(attention, "fastft.patch_model", "attention")
    check_flag(loss, "fastft.patch_model", "loss")
    base = _transformers_model(model)
    arch, swaps, attn_change, summary = _plan(base, backend, attention, loss)
    record = PatchRecord(arch=arch, summary=summary)
    try:  # all or nothing: a half-patched model has no record for unpatch_model to undo
        for module, new_cls in swaps:
            record.swapped.append((module, new_cls._fastft_original_class))
            _swap_class(module, new_cls)
        if attn_change is not None:
            # importing registers "fastft"; its kernel backend is fastft.register_attention's setting, not `backend`
            from fastft.integration.attention import NAME

            record.attn_implementation = attn_change
            base.set_attn_implementation(NAME)
        base._fastft_patch = record
    except BaseException:
        for module, cls in reversed(record.swapped):
            if type(module) is not cls:
                _swap_class(module, cls)
        if record.attn_implementation is not None:
            base.set_attn_implementation(record.attn_implementation)
        with contextlib.suppress(AttributeError):
            del base._fastft_patch
        raise
    return model


def unpatch_model(model: nn.Module) -> nn.Module:
    """Undo patch_model exactly: original classes (copies of patched modules made since included) and attention
    implementation. Returns the model."""
    check_model(model, "fastft.unpatch_model")
    base = _transformers_model(model)
    record = getattr(base, "_fastft_patch", None)
    if record is None:
        raise ValueError(f"fastft.unpatch_model: {type(base).__name__} is not patched (fastft.patch_model)")
    for module, cls in reversed(record.swapped):
        _swap_class(module, cls)
    # modules copied after patching (peft's modules_to_save deep-copies the patched module) are in no record
    for module in model.modules():
        cls = original_class(module)
        if cls is not type(module):
            _swap_class(module, cls)
    if record.attn_implementation is not None:
        base.set_attn_implementation(record.attn_implementation)
    del base._fastft_patch
    return model
