"""fastft prefix tuning refuses Gemma models (peft reshapes their prefix cache: validate_prefix_config). Nothing tested
the refusal: without it a Gemma model was accepted silently."""
import pytest
import torch
import transformers as T
from peft import PrefixTuningConfig

import fastft


@pytest.mark.parametrize("make", [
    lambda: T.GemmaForCausalLM(T.GemmaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, head_dim=8)),
    lambda: T.Gemma2ForCausalLM(T.Gemma2Config(vocab_size=128, hidden_size=32, intermediate_size=64,
                                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                               head_dim=8)),
], ids=["gemma", "gemma2"])
def test_prefix_tuning_on_gemma_is_refused(make):
    torch.manual_seed(0)
    with pytest.raises(ValueError, match="reshapes its prefix cache"):
        fastft.get_peft_model(make(), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
