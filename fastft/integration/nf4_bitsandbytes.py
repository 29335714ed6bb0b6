"""A transformers + bitsandbytes 4-bit model made a fastft NF4 model in place, without quantizing again.

peft's QLoRA recipe loads the model with `BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")`: its
layers are bitsandbytes `Linear4bit`s holding the layout fastft's NF4Weight reads (packed codes, block absmax, the
nested absmax of double quantization). `bitsandbytes_nf4_adopted` swaps each for an NF4Linear over the same storage
(no copy; dequantized values bit for bit bitsandbytes') and drops transformers' quantizer from the model, leaving
what `fastft.load_nf4_model` gives. fastft.get_peft_model (every method), load_adapter and quantize_model call it,
so that recipe runs fastft's fused kernels instead of peft's bitsandbytes LoRA layers. All or nothing: a model with
FP4 or 8-bit layers (which fastft does not read) stays as it was, with peft's bitsandbytes layers.
"""
from __future__ import annotations

import contextlib
import functools
import os
import sys
import warnings

from torch import nn

from fastft.modules.nf4_linear import NF4Linear
from fastft.quant.nf4_weight import NF4Weight


def bitsandbytes_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, layer) of every bitsandbytes 4-bit or 8-bit linear layer (each name of a layer registered twice)."""
    bnb = sys.modules.get("bitsandbytes")  # never imported: the model holds none of its layers
    if bnb is None:
        return []
    kinds = (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)
    return [(name, m) for name, m in model.named_modules(remove_duplicate=False) if isinstance(m, kinds)]


def _not_nf4(layer: nn.Module) -> str | None:
    """Why fastft cannot read this layer's weight, or None."""
    state = getattr(layer.weight, "quant_state", None)
    quant_type = getattr(state, "quant_type", None)
    if quant_type is None:
        return f"{type(layer).__name__} (8-bit)" if not hasattr(layer.weight, "quant_state") else "not quantized yet"
    if quant_type != "nf4":
        return f"quant_type {quant_type!r}"
    if layer.weight.device.type == "meta":
        return "weights offloaded (on the meta device)"
    if getattr(state, "packing_format_for_cpu", False):
        # at an inference forward on a CPU with AVX512-BF16: scales rounded to bf16, and bitsandbytes 0.50's state
        # dict gives them back out of order (its own dequantize is then ~40% off)
        return ("repacked by bitsandbytes for its CPU kernel at an inference forward; load the model again and call "
                "fastft before running it")
    return None


@contextlib.contextmanager
def bitsandbytes_nf4_adopted(model: nn.Module, who: str, *, warn: bool = True):
    """Swap the model's bitsandbytes NF4 layers for NF4Linears (_adopt) for the block, yielding how many; if the
    block raises (a config refused after the swap), the model gets its bitsandbytes layers and transformers'
    quantizer back, as it was: a failed call changes nothing."""
    undo = []
    count = _adopt(model, who, warn, undo)
    try:
        yield count
    except BaseException:
        for restore in reversed(undo):
            restore()
        raise


def _adopt(model: nn.Module, who: str, warn: bool, undo: list) -> int:
    """Swap every bitsandbytes NF4 Linear4bit of `model` for an NF4Linear on the same storage; returns how many
    layers changed (0: none, or some layer is one fastft does not read — then nothing changes, with a warning
    if `warn`). `who`: the calling function, for messages. `undo`: gets the calls that put it back."""
    layers = bitsandbytes_layers(model)
    if not layers:
        return 0
    from fastft.integration.nf4_model import finish_nf4_model, refuse_adapters

    # peft's own bitsandbytes LoRA layers (inject_adapter_in_model, a PeftModel's inner model) hold them: an NF4Linear
    # inside one would meet peft's bitsandbytes merge, which reads a quant_state
    refuse_adapters(model, f"fastft.{who}", "load the bitsandbytes model again and give it to fastft before peft")
    unread = [(name, why) for name, m in layers if (why := _not_nf4(m)) is not None]
    if unread:
        if not warn:
            return 0
        name, why = unread[0]
        warnings.warn(f"fastft.{who}: {len(unread)} bitsandbytes layer(s) fastft does not read ({name}: {why}); the "
                      "model keeps its bitsandbytes layers, where peft's own bitsandbytes forward runs (unfused). "
                      "For fastft's NF4 kernels load it with BitsAndBytesConfig(load_in_4bit=True, "
                      "bnb_4bit_quant_type='nf4'), or the dense checkpoint with fastft.load_nf4_model",
                      stacklevel=_user_frame())
        return 0
    _warn_compute_dtype(layers, who)
    adopted: dict[int, NF4Linear] = {}
    for name, layer in layers:  # a layer registered under two names gets one NF4Linear at both
        if id(layer) not in adopted:
            adopted[id(layer)] = _nf4_linear(layer)
        model.set_submodule(name, adopted[id(layer)])
        undo.append(functools.partial(model.set_submodule, name, layer))
    _drop_quantizer(model, undo)
    finish_nf4_model(model, undo)
    return len(adopted)


def _nf4_linear(layer: nn.Module) -> NF4Linear:
    """The NF4Linear over `layer`'s own packed codes and scales (its bias the same Parameter), keeping accelerate's
    device hook where transformers dispatched the model over devices."""
    state = {k: v for k, v in layer.state_dict().items() if k.startswith("weight")}
    weight = NF4Weight.from_bnb_state_dict(state, "weight")
    new = NF4Linear(layer.in_features, layer.out_features, bias=False, weight=weight, blocksize=weight.blocksize,
                    double_quant=weight.double_quant)
    new.bias = layer.bias
    new.from_conv1d = _replaced_conv1d(layer)
    new.train(layer.training)
    hook = getattr(layer, "_hf_hook", None)
    if hook is not None:
        from accelerate.hooks import add_hook_to_module

        add_hook_to_module(new, hook)
    return new


def _replaced_conv1d(layer: nn.Module) -> bool:
    """Whether the layer stands for a transformers Conv1D (GPT-2's), whose class transformers records on the layer
    (`source_cls`) when it quantizes one as bitsandbytes does, transposed: merge_and_unload then gives a Conv1D back,
    so the merged model saves in its own layout (an nn.Linear's (out, in) weight under a Conv1D's name would load
    transposed: silently, for a square one)."""
    from transformers.pytorch_utils import Conv1D

    source = getattr(layer, "source_cls", None)
    return isinstance(source, type) and issubclass(source, Conv1D)


def _warn_compute_dtype(layers, who: str) -> None:
    """bitsandbytes computes in `bnb_4bit_compute_dtype` (fp32 unless set); fastft's NF4 layers in their input's
    dtype (fp32 inputs on weights quantized from bf16: in bf16). Said once where the two differ."""
    differ = [(name, m) for name, m in layers
              if m.compute_dtype is not None and m.compute_dtype != m.weight.quant_state.dtype]
    if differ:
        name, m = differ[0]
        warnings.warn(f"fastft.{who}: {len(differ)} bitsandbytes layer(s) had bnb_4bit_compute_dtype="
                      f"{m.compute_dtype} over weights quantized from {m.weight.quant_state.dtype} ({name}); fastft's "
                      "NF4 layers compute in their input's dtype (an fp32 input on weights quantized from bf16: in "
                      "bf16, as bnb_4bit_compute_dtype=torch.bfloat16 would)", stacklevel=_user_frame())


_FASTFT = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep  # the fastft package's folder


def _user_frame() -> int:
    """warnings.warn's stacklevel, from the function calling this one, of the first frame outside fastft and
    contextlib: the user's call (the entry points reach the swap through a context manager, at depths that differ)."""
    frame, level = sys._getframe(1), 1
    while frame is not None and (os.path.abspath(frame.f_code.co_filename).startswith(_FASTFT)
                                 or frame.f_code.co_filename == contextlib.__file__):
        frame, level = frame.f_back, level + 1
    return level


def _drop_quantizer(model: nn.Module, undo: list) -> None:
    """What transformers set on a model it quantized: its layers are fastft's now (transformers' save_pretrained
    would write them as bitsandbytes layers, peft would look for some). `fastft.save_nf4_model` writes the
    bitsandbytes config again."""
    cleared = {"hf_quantizer": None, "quantization_method": None, "is_quantized": False, "is_loaded_in_4bit": False}
    for module in model.modules():
        for attribute, value in cleared.items():
            if attribute in vars(module):
                undo.append(functools.partial(setattr, module, attribute, getattr(module, attribute)))
                setattr(module, attribute, value)
        config = getattr(module, "config", None)
        if config is not None and "quantization_config" in vars(config):  # the config the submodules share
            undo.append(functools.partial(setattr, config, "quantization_config", config.quantization_config))
            del config.quantization_config
