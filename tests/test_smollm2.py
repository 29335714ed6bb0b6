"""LoRA on the real SmolLM2-135M (a Llama with GQA and tied embeddings): fastft against peft."""
import copy

import peft
import pytest
import torch
from peft import LoraConfig, PeftModel

import fastft
from fastft.apps.models import load_causal_lm
from tests.utils import ALL_LINEAR, first_layers, interpreter_only, randomize_lora_B

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    model, tokenizer = load_causal_lm()
    model = first_layers(model).eval()
    batch = tokenizer(["The quick brown fox jumps over the lazy dog.", "LoRA adapts a frozen model."],
                      return_tensors="pt", padding=True)
    return model, batch


def _pair(model, config):
    ref = peft.get_peft_model(copy.deepcopy(model), copy.deepcopy(config))
    randomize_lora_B(ref, std=0.02)
    ours = fastft.get_peft_model(copy.deepcopy(model), copy.deepcopy(config))
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def test_logits_and_round_trips_match_peft(smollm2, tmp_path):
    model, batch = smollm2
    ref, ours = _pair(model, LoraConfig(r=8, lora_alpha=16, target_modules=ALL_LINEAR))
    with torch.no_grad():
        expected = ref(**batch).logits
        assert torch.allclose(ours(**batch).logits, expected, atol=1e-4)
        base = model(**batch).logits
    assert not torch.allclose(expected, base, atol=1e-3)  # the adapter changes the output

    fastft.save_adapter(ours, tmp_path / "ours")
    ref.save_pretrained(str(tmp_path / "peft"))
    by_peft = PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path / "ours"))
    by_fastft = fastft.load_adapter(copy.deepcopy(model), tmp_path / "peft")
    with torch.no_grad():
        assert torch.allclose(by_peft(**batch).logits, expected, atol=1e-4)
        assert torch.allclose(by_fastft(**batch).logits, expected, atol=1e-4)


def test_training_steps_track_peft(smollm2):
    """Convergence check: the same AdamW steps from the same start give the same losses and adapters."""
    model, batch = smollm2
    config = LoraConfig(r=8, lora_alpha=16, target_modules=ALL_LINEAR)
    ref, ours = _pair(model, config)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    losses = {}
    for name, m in (("peft", ref), ("fastft", ours)):
        m.train()
        opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3)
        losses[name] = []
        for _ in range(4):
            loss = m(**batch, labels=labels).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses[name].append(loss.item())
    assert losses["fastft"][-1] < losses["fastft"][0]
    assert losses["fastft"] == pytest.approx(losses["peft"], rel=1e-4)
    ref_state = {k: v for k, v in ref.state_dict().items() if "lora_" in k}
    for k, v in ours.state_dict().items():
        if "lora_" in k:
            assert torch.allclose(v, ref_state[k], atol=1e-5), k


@interpreter_only
def test_triton_kernels_on_real_layers(smollm2, monkeypatch):
    """The Triton path (interpreter) on two real layers, first and last, forward and backward."""
    monkeypatch.setenv("FASTFT_LORA_BACKEND", "triton")
    model, batch = smollm2
    last = len(model.model.layers) - 1  # first_layers keeps a few of SmolLM2's 30
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "down_proj"], layers_to_transform=[0, last])
    ref, ours = _pair(model, config)
    small = {k: v[:1, :6] for k, v in batch.items()}
    out_ref = ref(**small, labels=small["input_ids"])
    out = ours(**small, labels=small["input_ids"])
    out_ref.loss.backward()
    out.loss.backward()
    assert torch.allclose(out.logits, out_ref.logits, atol=1e-4)
    grads_ref = {n: p.grad for n, p in ref.named_parameters() if p.requires_grad}
    for n, p in ours.named_parameters():
        if p.requires_grad:
            assert torch.allclose(p.grad, grads_ref[n], rtol=1e-3, atol=1e-6), n
