"""The random-init benchmark shapes have the real models' parameter counts (from their config.json sizes):
Llama-3.2-1B 1,235,814,400 (tied embeddings), Llama-3.1-8B 8,030,261,248 (its own lm_head), SmolLM2-135M
134,515,008. Counted from the config, nothing is built."""
import pytest

from fastft.apps.bench.shapes import llama_config


def _params(c) -> int:
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    h, kv = c.hidden_size, c.num_key_value_heads * head_dim
    q = c.num_attention_heads * head_dim
    layer = h * q + 2 * h * kv + q * h + 3 * h * c.intermediate_size + 2 * h
    embed = c.vocab_size * h
    return embed * (1 if c.tie_word_embeddings else 2) + c.num_hidden_layers * layer + h


@pytest.mark.parametrize("shape, count", [("llama-1b", 1_235_814_400), ("llama-8b", 8_030_261_248),
                                          ("smollm2-135m-shape", 134_515_008)])
def test_shape_has_the_real_models_parameter_count(shape, count):
    assert _params(llama_config(shape, 2048)) == count
