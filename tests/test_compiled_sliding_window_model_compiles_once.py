"""A model on attn_implementation='fastft' with sliding and full layers (Qwen2 with use_sliding_window, Qwen2-MoE)
compiled twice under torch.compile: each forward builds a full and a sliding causal mask, and the window note the
fastft mask function kept for the model flipped between them, failing dynamo's guards on it at the second call.
Models with layer_types read their window from the types: the note is kept only for models without them."""
import pytest
import torch
import transformers
from peft import LoraConfig

import fastft
from tests.utils import graphs_per_training_call


def _tiny(config_class, model_class, **overrides):
    torch.manual_seed(0)
    config = config_class(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, sliding_window=5,
                          **overrides)
    return model_class(config)


@pytest.mark.parametrize("build", [
    lambda: _tiny(transformers.Qwen2Config, transformers.Qwen2ForCausalLM, use_sliding_window=True,
                  max_window_layers=1),
    lambda: _tiny(transformers.Qwen2MoeConfig, transformers.Qwen2MoeForCausalLM, use_sliding_window=True,
                  max_window_layers=1, moe_intermediate_size=16, shared_expert_intermediate_size=16, num_experts=4,
                  num_experts_per_tok=2),
], ids=["qwen2", "qwen2_moe"])
def test_three_compiled_training_steps_of_a_sliding_window_model_compile_one_graph(build):
    torch._dynamo.reset()
    base = build()
    assert {"sliding_attention", "full_attention"} <= set(base.config.layer_types)
    fastft.register_attention()
    base.set_attn_implementation("fastft")
    model = fastft.get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj"]))
    model.train()
    compiled = torch.compile(model, backend="eager")
    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    graphs = graphs_per_training_call(compiled, ids)
    assert graphs == [1, 0, 0], graphs
    # and each layer still gets its window: the compiled loss is the eager sdpa model's
    with torch.no_grad():
        loss = compiled(input_ids=ids, labels=ids).loss
        base.set_attn_implementation("sdpa")
        assert torch.allclose(loss, model(input_ids=ids, labels=ids).loss, rtol=1e-5, atol=1e-6)
