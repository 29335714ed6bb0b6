"""Prompt tuning and P-tuning generate a left-padded OPT row as its unpadded forward: OPT counts positions over the
attention mask when given none (as in peft's forward), so a padded row's real tokens follow its virtual tokens;
fastft's generate passed positions counting the padding, and the padded row drifted (found by the round-15
registry sweep, docs/fuzz-results.md)."""
import peft
import pytest
import torch
import transformers as T

import fastft
from tests.methods_utils import assert_generates_as_its_forward, perturb_trainables


@pytest.mark.parametrize("config", [
    lambda: peft.PromptTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM"),
    lambda: peft.PromptEncoderConfig(num_virtual_tokens=4, encoder_hidden_size=16, task_type="CAUSAL_LM"),
], ids=["prompt", "p-tuning"])
def test_left_padded_opt_generates_as_its_forward(config):
    torch.manual_seed(0)
    base = T.OPTForCausalLM(T.OPTConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, ffn_dim=128,
                                        num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=64,
                                        init_std=0.1, dropout=0.0, attention_dropout=0.0, pad_token_id=0,
                                        bos_token_id=1, eos_token_id=2))
    base.generation_config.eos_token_id = None
    model = fastft.get_peft_model(base, config())
    perturb_trainables(model)
    assert_generates_as_its_forward(model, new_tokens=4)
