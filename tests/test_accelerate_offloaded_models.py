"""Models accelerate offloaded (cpu_offload, disk_offload, a device_map with "disk" entries), from an audit.

- A patched model's RMSNorm made its output again in backward from `self.weight`, which the offload hook had put
  back on the meta device after the forward: backward raised ("`weight` is on meta").
- Adapters built on a model already offloaded are put on meta beside the offloaded layers (peft's too): logits NaN
  (fastft) or garbage (peft), backward failing. Every fastft entry point now refuses that, saying to apply the
  method before offloading; what works (offload after wrapping, adapters beside layers that stay, peft's own
  re-dispatch when an adapter loads onto a device_map model) is not refused.
"""
from __future__ import annotations

import copy
import warnings

import peft
import pytest
import torch
from accelerate import cpu_offload, dispatch_model
from peft import IA3Config, LoraConfig, PromptTuningConfig

import fastft
from fastft.integration.methods.adapter import BottleneckAdapterConfig
from tests.methods_utils import ids
from tests.utils import tiny_llama

# layer 0 on "disk" (offloaded: meta between calls), the rest where it is (main device cpu)
DISK_LAYER_0 = {"model.embed_tokens": "cpu", "model.layers.0": "disk", "model.layers.1": "cpu", "model.norm": "cpu",
                "model.rotary_emb": "cpu", "lm_head": "cpu"}


def _dispatch(model, device_map, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # accelerate's note that parameters are on meta
        return dispatch_model(model, device_map=device_map, main_device="cpu", offload_dir=str(tmp_path))


def _lora(**kw):
    return LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": "all-linear", "init_lora_weights": False, **kw})


def test_a_patched_model_under_cpu_offload_trains_as_the_unpatched_one():
    x = ids()
    grads = {}
    for patched, offloaded in ((False, False), (True, True)):
        model = tiny_llama()
        if patched:
            fastft.patch_model(model)
        if offloaded:
            cpu_offload(model, execution_device=torch.device("cpu"))
        embeds = torch.randn(2, x.shape[1], 64, generator=torch.Generator().manual_seed(6), requires_grad=True)
        loss = model(inputs_embeds=embeds, labels=x).loss
        loss.backward()
        grads[patched] = (loss.detach(), embeds.grad)
    torch.testing.assert_close(grads[True][0], grads[False][0], rtol=0, atol=1e-6)
    torch.testing.assert_close(grads[True][1], grads[False][1], rtol=1e-5, atol=1e-7)


def test_a_patched_lora_model_dispatched_with_a_disk_layer_gets_peft_s_gradients(tmp_path):
    x = ids()
    grads = {}
    for name in ("peft", "fastft+patch_model"):
        torch.manual_seed(1)
        model = (peft if name == "peft" else fastft).get_peft_model(tiny_llama(), _lora())
        if name != "peft":
            fastft.patch_model(model)
        _dispatch(model.base_model.model, DISK_LAYER_0, tmp_path / name)
        model(input_ids=x, labels=x).loss.backward()
        grads[name] = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert len(grads["peft"]) == 14  # layer 1's adapters (layer 0's, offloaded after wrapping, are not trained)
    assert grads["fastft+patch_model"].keys() == grads["peft"].keys()
    for n, g in grads["peft"].items():
        torch.testing.assert_close(grads["fastft+patch_model"][n], g, rtol=1e-5, atol=1e-7)


CONFIGS = {
    "lora": lambda: _lora(),
    "dora": lambda: _lora(use_dora=True),
    "ia3": lambda: IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]),
    "prompt": lambda: PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
    "bottleneck": lambda: BottleneckAdapterConfig(size=4),
}


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_get_peft_model_on_an_offloaded_model_is_refused(method):
    base = tiny_llama()
    cpu_offload(base, execution_device=torch.device("cpu"))
    with pytest.raises(ValueError, match="offloaded by accelerate.*apply the method before offloading"):
        fastft.get_peft_model(base, CONFIGS[method]())


def test_get_peft_model_on_a_model_dispatched_with_a_disk_layer_is_refused(tmp_path):
    base = _dispatch(tiny_llama(), DISK_LAYER_0, tmp_path)
    with pytest.raises(ValueError, match=r"layers\.0\..*lora_A.*on the meta device with no values"):
        fastft.get_peft_model(base, _lora())


def test_adapters_beside_layers_that_stay_are_not_refused(tmp_path):
    """Only the embeddings offloaded: the adapters sit beside layers that keep their weights; peft's numbers."""
    device_map = {**DISK_LAYER_0, "model.embed_tokens": "disk", "model.layers.0": "cpu"}
    x = ids()
    out = {}
    for lib in (peft, fastft):
        base = _dispatch(tiny_llama(), device_map, tmp_path / lib.__name__)
        torch.manual_seed(1)
        model = lib.get_peft_model(base, _lora(target_modules=["q_proj", "v_proj"]))
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        out[lib.__name__] = (loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    torch.testing.assert_close(out["fastft"][0], out["peft"][0], rtol=0, atol=1e-6)
    assert out["fastft"][1].keys() == out["peft"][1].keys() and len(out["peft"][1]) == 8
    for n, g in out["peft"][1].items():
        torch.testing.assert_close(out["fastft"][1][n], g, rtol=1e-5, atol=1e-7)


def test_add_adapter_after_offloading_is_not_refused():
    """peft leaves an adapter beside offloaded ones where it was built (on the CPU, with values): it runs."""
    x = ids()
    torch.manual_seed(1)
    model = fastft.get_peft_model(tiny_llama(), _lora())
    twin = copy.deepcopy(model)
    cpu_offload(model, execution_device=torch.device("cpu"))
    logits = []
    for m in (model, twin):
        torch.manual_seed(2)
        fastft.add_adapter(m, "second", _lora())
        m.set_adapter("second")
        with torch.no_grad():
            logits.append(m(input_ids=x).logits)
    torch.testing.assert_close(logits[0], logits[1], rtol=1e-5, atol=1e-6)


def test_load_adapter_onto_a_cpu_offloaded_model_is_refused(tmp_path):
    fastft.get_peft_model(tiny_llama(), _lora()).save_pretrained(tmp_path / "adapter")
    base = tiny_llama()
    cpu_offload(base, execution_device=torch.device("cpu"))
    with pytest.raises(ValueError, match="load_adapter: .*lora_A.*on the meta device with no values"):
        fastft.load_adapter(base, tmp_path / "adapter")


def test_load_adapter_onto_a_device_map_model_runs_as_peft_s(tmp_path):
    """peft's load_adapter dispatches a device_map model again with the adapter's weights offloaded beside the
    layer's: they have values (in the weights map), which the check reads."""
    torch.manual_seed(1)
    fastft.get_peft_model(tiny_llama(), _lora()).save_pretrained(tmp_path / "adapter")
    x = ids()
    logits = {}
    for name in ("peft", "fastft"):
        base = _dispatch(tiny_llama(), DISK_LAYER_0, tmp_path / name)
        base.hf_device_map = dict(DISK_LAYER_0)  # as from_pretrained(device_map=...) records it
        model = (peft.PeftModel.from_pretrained(base, tmp_path / "adapter") if name == "peft"
                 else fastft.load_adapter(base, tmp_path / "adapter"))
        with torch.no_grad():
            logits[name] = model(input_ids=x).logits
    reference = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "adapter")
    with torch.no_grad():
        want = reference(input_ids=x).logits
    torch.testing.assert_close(logits["peft"], want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logits["fastft"], want, rtol=1e-5, atol=1e-6)


def test_offload_after_wrapping_is_not_refused():
    x = ids()
    torch.manual_seed(1)
    model = fastft.get_peft_model(tiny_llama(), _lora())
    with torch.no_grad():
        want = model(input_ids=x).logits
    twin = copy.deepcopy(model)
    cpu_offload(twin, execution_device=torch.device("cpu"))
    with torch.no_grad():
        torch.testing.assert_close(twin(input_ids=x).logits, want, rtol=1e-5, atol=1e-6)


def test_low_cpu_mem_usage_adapters_on_meta_are_the_caller_s_plan():
    """peft's low_cpu_mem_usage=True builds adapters on meta for a state dict loaded next: not refused."""
    base = tiny_llama()
    cpu_offload(base, execution_device=torch.device("cpu"))
    model = fastft.get_peft_model(base, _lora(), low_cpu_mem_usage=True)
    assert any(p.is_meta for n, p in model.named_parameters() if "lora_A" in n)
