"""The prefix room's guard (fastft.integration.attention.prefix_expected: inside the block every fastft attention
call must carry the prefix) holds for its own thread only, and a nested block leaves the outer one guarded.

A guard shared by every thread would stop another thread's plain forward (a base model or an evaluation run beside
a prefix model's forward); an inner block that reset the state to off on exit would let the rest of the outer
block run attention without its prefix, silently."""
import threading

import pytest
import torch
import transformers as T

from fastft.integration.attention import NAME, prefix_expected


def _llama_on_fastft():
    torch.manual_seed(0)
    model = T.LlamaForCausalLM(T.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=64,
                                             num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                             max_position_embeddings=64))
    model.set_attn_implementation(NAME)
    return model.eval()


def test_a_nested_block_leaves_the_outer_one_guarded():
    model, ids = _llama_on_fastft(), torch.randint(0, 128, (1, 5))
    with prefix_expected():
        with prefix_expected():
            pass
        with pytest.raises(ValueError, match="called without the prefix"):
            model(input_ids=ids)
    model(input_ids=ids)  # outside every block: no prefix expected


def test_another_threads_block_does_not_guard_this_thread():
    model, ids = _llama_on_fastft(), torch.randint(0, 128, (1, 5))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    inside, release, errors = threading.Event(), threading.Event(), []

    def hold():
        try:
            with prefix_expected():
                inside.set()
                release.wait(30)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert inside.wait(30)
        with torch.no_grad():
            torch.testing.assert_close(model(input_ids=ids).logits, expected, rtol=0, atol=0)
    finally:
        release.set()
        holder.join(30)
    assert not errors
