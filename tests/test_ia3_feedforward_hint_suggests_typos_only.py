"""IA3's feed-forward error suggests a module name only for a typo (difflib cutoff 0.85): on OPT (no down_proj; its
attention has k_proj/v_proj) a 'down_proj' entry is no mistyped 'v_proj' (an attention layer, no feed-forward one),
while a mistyped 'fc2' still gets its suggestion. The existing test ran on GPT-2, whose targets hold no name
'down_proj' is close to, so the cutoff was never exercised."""
import pytest
import torch
import transformers as T

from fastft.integration.methods import MethodOptions, apply_method


def _opt():
    torch.manual_seed(0)
    return T.OPTForCausalLM(T.OPTConfig(vocab_size=128, hidden_size=64, num_hidden_layers=1, ffn_dim=128,
                                        num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=64,
                                        pad_token_id=0, bos_token_id=1, eos_token_id=2))


def test_a_feedforward_module_the_model_lacks_is_not_called_an_attention_typo():
    with pytest.raises(ValueError) as error:
        apply_method(_opt(), "ia3", MethodOptions(ia3_target_modules=("k_proj", "v_proj", "down_proj"),
                                                  ia3_feedforward_modules=("down_proj",)))
    message = str(error.value)
    assert "IA3Config.feedforward_modules entries ['down_proj']" in message
    assert "did you mean" not in message and "'v_proj'?" not in message and "'k_proj'?" not in message


def test_a_mistyped_feedforward_module_gets_its_suggestion():
    with pytest.raises(ValueError, match=r"IA3Config.feedforward_modules entries \['fc_2'\].*did you mean 'fc2'"):
        apply_method(_opt(), "ia3", MethodOptions(ia3_target_modules=("k_proj", "v_proj", "fc2", "fc_2"),
                                                  ia3_feedforward_modules=("fc_2",)))
