"""fastft.patch_model on model types outside its table that transformers builds from a table architecture's own
classes (EXAONE, InternLM3, IQuestCoder are LlamaForCausalLM): patched as Llama (they were refused by model_type),
matching the unpatched model's logits, loss and every LoRA gradient; other types are still refused by name."""
import pytest
import torch
from peft import LoraConfig

import fastft
from tests.test_patch_model import _assert_matches, _batch, _run
from tests.utils import known_model_types, randomize_lora_B

transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("model_type", known_model_types("exaone", "internlm3"))
def test_a_llama_class_under_another_model_type_is_patched_as_llama(model_type):
    from transformers import CONFIG_MAPPING, AutoModelForCausalLM

    config = CONFIG_MAPPING[model_type](vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                        max_position_embeddings=64, pad_token_id=0)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).train()
    assert type(model).__name__ == "LlamaForCausalLM"
    with torch.no_grad():  # norms away from the identity
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.2)
    torch.manual_seed(3)
    model = fastft.get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]))
    randomize_lora_B(model)
    ids, labels = _batch()
    want = _run(model, ids, labels)
    fastft.patch_model(model, backend="torch")
    summary = model.get_base_model()._fastft_patch.summary
    assert summary["model_type"] == model_type and summary["rms_norm"] == 5 and summary["fused_loss"]
    _assert_matches(_run(model, ids, labels), want)


def test_another_class_is_still_refused():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=2, n_positions=32))
    with pytest.raises(ValueError, match="architecture 'gpt2' is not supported"):
        fastft.patch_model(model)
