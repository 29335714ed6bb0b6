"""A QLoRA model holding a DoRA adapter on an NF4 base beside a plain LoRA one: merging DoRA into an NF4 weight is
refused, but the refusal came from the first QDoRA layer peft's merge reached, after the layers before it were
merged (NF4 weights requantized with ΔW: the plain adapter's outputs 3e-2 off, unmerge did not undo it), and under
merge_and_unload unloaded too (fuzz-found, 2026-12-06). The whole model is checked before any layer changes."""
import copy

import pytest
import torch
from peft import LoraConfig
from transformers import LlamaConfig, LlamaForCausalLM

import fastft

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _model():
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2)).eval()
    model = fastft.get_peft_model(fastft.quantize_model(copy.deepcopy(base)),
                                  LoraConfig(r=4, lora_alpha=8, target_modules=ALL))
    model.add_adapter("d", LoraConfig(r=3, lora_alpha=6, target_modules=["down_proj"], use_dora=True))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    return model.eval()


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("merge", ["merge_adapter", "merge_and_unload"])
def test_a_refused_qdora_merge_changes_nothing(merge):
    model = _model()
    ids = torch.randint(0, 128, (2, 9))
    model.set_adapter("default")
    with torch.no_grad():
        before_logits = model(ids).logits
    before = _state(model)
    if merge == "merge_adapter":
        call = lambda: model.merge_adapter(["default", "d"])  # noqa: E731
    else:
        model.base_model.set_adapter(["default", "d"])
        call = model.merge_and_unload
    with pytest.raises(NotImplementedError, match="merging DoRA into an NF4 weight"):
        call()
    assert not [n for n, m in model.named_modules() if getattr(m, "merged_adapters", None)]
    after = _state(model)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    model.set_adapter("default")
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before_logits)
    model.merge_adapter(["default"])  # a merge without DoRA still runs
    assert [n for n, m in model.named_modules() if getattr(m, "merged_adapters", None)]
