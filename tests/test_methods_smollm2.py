"""Every method on the real SmolLM2-135M in one model load: fastft's rooms against peft (DoRA, IA3, prefix,
prompt) or a plain-torch reference (bottleneck adapters) — logits and every trainable gradient.
On the CPU each fused op takes its torch path; the kernels are checked against fp64 in the per-method files.
One load and one copy per method: peft's side runs on the loaded model itself and is unloaded after."""
import copy

import peft
import pytest
import torch
from peft import IA3Config, LoraConfig, PrefixTuningConfig, PromptTuningConfig

import fastft
from fastft.apps.models import load_causal_lm
from fastft.integration.methods.adapter import AdapterAfter, BottleneckAdapterConfig
from tests.methods_utils import assert_same_step, copy_trainables, perturb_trainables
from tests.test_methods_adapter import _reference_hooks
from tests.utils import ALL_LINEAR, assert_close, first_layers

pytestmark = pytest.mark.slow

PEFT_CONFIGS = {
    "dora": lambda: LoraConfig(r=4, lora_alpha=8, target_modules=ALL_LINEAR, use_dora=True),
    "ia3": lambda: IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"],
                             task_type="CAUSAL_LM"),
    "prefix": lambda: PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
    "prompt": lambda: PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
}


def _step(model, batch):
    model.zero_grad(set_to_none=True)
    out = model(**batch, labels=batch["input_ids"])
    out.loss.backward()
    return out.logits.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_every_method_matches_its_reference_on_smollm2():
    model, tokenizer = load_causal_lm()
    model = first_layers(model).eval()
    batch = dict(tokenizer(["Adapters, prefixes and magnitudes all train here."], return_tensors="pt"))
    for method, make in PEFT_CONFIGS.items():
        ours = fastft.get_peft_model(copy.deepcopy(model), make())
        perturb_trainables(ours, std=0.02)
        got = _step(ours, batch)
        theirs = peft.get_peft_model(model, make())
        copy_trainables(ours, theirs)
        del ours
        # fp32 through 6 layers (the first of 30): a bound above the per-op 2e-5 (the ops themselves are checked against fp64)
        assert_same_step(got, _step(theirs, batch), f"SmolLM2 {method}", tol=5e-4)
        model = theirs.unload() if method in ("dora", "ia3") else theirs.get_base_model()
        assert type(model).__name__ == "LlamaForCausalLM" and not any("lora_" in n or "ia3_" in n
                                                                       for n, _ in model.named_parameters())

    config = BottleneckAdapterConfig(size=16, placement="houlsby", activation="silu")
    ours = fastft.get_peft_model(copy.deepcopy(model), config)
    perturb_trainables(ours, std=0.02)
    reference = copy.deepcopy(model)
    params = _reference_hooks(reference, ours, config)
    logits, grads = _step(ours, batch)
    ref = reference(**batch, labels=batch["input_ids"])
    ref.loss.backward()
    assert_close(logits, ref.logits, torch.float32, "SmolLM2 adapter logits")
    assert len(grads) == 4 * sum(isinstance(m, AdapterAfter) for m in ours.modules()) > 0
    for name, grad in grads.items():
        module, _, key = name.removeprefix("base_model.model.").partition(".adapter.")
        assert_close(grad, params[module][key].grad, torch.float32, f"SmolLM2 adapter grad {name}")
