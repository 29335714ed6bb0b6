"""fastft.load_adapter loads a saved prefix-tuning adapter into a fastft prefix model as another adapter, as
peft's own load_adapter does and as fastft loads prompt tuning, P-tuning and IA3 ones (it refused: the round-15
registry sweep found the model's own load_adapter working where fastft's refused). set_adapter switches between
them, each giving the logits of the model that saved it; a prefix adapter into another kind of PeftModel is still
refused."""
import peft
import pytest
import torch
import transformers as T

import fastft
from tests.methods_utils import perturb_trainables

IDS = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(0))


def _llama():
    torch.manual_seed(0)
    return T.LlamaForCausalLM(T.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))


def _saved_prefix(path, seed):
    model = fastft.get_peft_model(_llama(), peft.PrefixTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM"))
    perturb_trainables(model, seed=seed)
    model.save_pretrained(path)
    with torch.no_grad():
        return model.eval()(input_ids=IDS).logits


def test_a_second_prefix_adapter_loads_and_switches(tmp_path):
    first, second = _saved_prefix(tmp_path / "a", seed=1), _saved_prefix(tmp_path / "b", seed=2)
    assert not torch.allclose(first, second)
    model = fastft.load_adapter(_llama(), tmp_path / "a")
    assert fastft.load_adapter(model, tmp_path / "b", adapter_name="b") is model
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=IDS).logits, first, rtol=0, atol=0)
        model.set_adapter("b")
        torch.testing.assert_close(model(input_ids=IDS).logits, second, rtol=0, atol=0)


def test_a_prefix_adapter_into_a_lora_model_is_refused(tmp_path):
    _saved_prefix(tmp_path / "a", seed=1)
    lora = fastft.get_peft_model(_llama(), peft.LoraConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="a prefix-tuning adapter loads into a plain transformers model or a fastft "
                                         "prefix-tuning model, not into a"):
        fastft.load_adapter(lora, tmp_path / "a", adapter_name="b")
