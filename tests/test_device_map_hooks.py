"""A model spread over GPUs by `device_map="auto"` (accelerate's dispatch_model) carries an AlignDevicesHook on
every module that holds tensors. Without offload the hook only moves a call's inputs to the module's device, where
they already are: the fused layers and the fused loss stay on (they fell back to peft's forward and the unfused
loss, with a warning, for every such model). Offload hooks, hooks on another device, and any other hook still make
the module be called.

dispatch_model with every module on the CPU attaches the same non-offload hooks a GPU map does (execution device
"cpu"), which is how this runs here."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from accelerate import dispatch_model
from accelerate.hooks import AlignDevicesHook, ModelHook, add_hook_to_module
from peft import IA3Config, LoraConfig
from torch import nn

import fastft
import fastft.integration.methods.adapter.layer as adapter_layer
import fastft.integration.methods.dora as dora_layer
import fastft.integration.methods.ia3 as ia3_layer
import fastft.modules.lora as lora_layer
import fastft.modules.qlora as qlora_layer
from fastft.integration.methods.adapter import BottleneckAdapterConfig
from fastft.ops.shared import device_hook_moves_nothing, forward_interceptor
from tests.methods_utils import assert_same_step, ids, perturb_trainables, step
from tests.utils import tiny_llama

TARGETS = ["q_proj", "v_proj", "down_proj"]
METHODS = {  # method: (build the adapted model, the module and the name of the fused op its layers call)
    "lora": (lambda: fastft.get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS)),
             lora_layer, "lora_linear"),
    "qlora": (lambda: fastft.get_peft_model(fastft.quantize_model(tiny_llama(), "nf4"),
                                            LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS)),
              qlora_layer, "qlora_linear"),
    "dora": (lambda: fastft.get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                                                    use_dora=True)),
             dora_layer, "dora_linear"),
    "ia3": (lambda: fastft.get_peft_model(tiny_llama(), IA3Config(target_modules=TARGETS,
                                                                  feedforward_modules=["down_proj"])),
            ia3_layer, "ia3_linear"),
    "adapter": (lambda: fastft.get_peft_model(tiny_llama(), BottleneckAdapterConfig(size=8, placement="houlsby")),
                adapter_layer, "bottleneck_adapter"),
}


def counting(monkeypatch, module, name: str) -> list:
    calls = []
    fused = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **k: (calls.append(1), fused(*a, **k))[1])
    return calls


def spread_over_devices(model):
    """What dispatch_model does for a device_map over several GPUs, with the CPU as the one device."""
    return dispatch_model(model, device_map={"": "cpu"}, force_hooks=True)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_layers_stay_fused_under_a_device_map_hook(method, monkeypatch):
    build, module, op = METHODS[method]
    model = build()
    perturb_trainables(model)
    model.train()
    batch = ids()
    expected = step(model, batch)
    dispatched = spread_over_devices(copy.deepcopy(model))
    hooked = [m for m in dispatched.modules() if type(m.__dict__.get("_hf_hook")) is AlignDevicesHook]
    assert len(hooked) > 10   # every module with tensors, adapters included
    calls = counting(monkeypatch, module, op)
    assert_same_step(step(dispatched, batch), expected, f"{method} under dispatch_model")
    assert calls, f"{method}: the device_map hooks turned the fused op off"


def test_fused_loss_stays_on_under_a_device_map_hook():
    model = fastft.patch_model(fastft.get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=TARGETS)))
    perturb_trainables(model)
    model.train()
    batch = ids()
    expected = model(input_ids=batch, labels=batch).loss
    dispatched = spread_over_devices(copy.deepcopy(model))
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # "computes its loss unfused" was warned
        out = dispatched(input_ids=batch, labels=batch)
    assert out.logits is None   # the fused loss computes no logits
    torch.testing.assert_close(out.loss, expected)


def hooked_linear(**hook_options) -> nn.Linear:
    layer = nn.Linear(4, 4)
    add_hook_to_module(layer, AlignDevicesHook(**hook_options))
    return layer


def test_which_accelerate_hooks_move_nothing():
    cpu = torch.device("cpu")
    assert device_hook_moves_nothing(hooked_linear(execution_device="cpu"), cpu)
    assert forward_interceptor(hooked_linear(execution_device="cpu"), cpu) is None
    # no device named (a caller that does not know where the op runs), another device: the hook would move inputs
    assert forward_interceptor(hooked_linear(execution_device="cpu")) is not None
    assert not device_hook_moves_nothing(hooked_linear(execution_device="cpu"), torch.device("meta"))
    # the module's own tensors elsewhere than the hook's device
    layer = hooked_linear(execution_device="cpu")
    layer.bias = nn.Parameter(torch.zeros(4, device="meta"))
    assert not device_hook_moves_nothing(layer, cpu)
    # hooks that do more than move inputs
    assert not device_hook_moves_nothing(hooked_linear(execution_device="cpu", io_same_device=True), cpu)
    assert not device_hook_moves_nothing(hooked_linear(execution_device="cpu", offload=True), cpu)
    layer = hooked_linear(execution_device="cpu")
    add_hook_to_module(layer, ModelHook(), append=True)  # a SequentialHook of both
    assert forward_interceptor(layer, cpu) is not None
    # a forward of the user's own put over accelerate's
    layer = hooked_linear(execution_device="cpu")
    layer.forward = lambda x: 2 * x
    assert forward_interceptor(layer, cpu) is not None
    # a forward hook still counts, whatever accelerate's hook does
    layer = hooked_linear(execution_device="cpu")
    layer.register_forward_hook(lambda *args: None)
    assert forward_interceptor(layer, cpu) is not None
