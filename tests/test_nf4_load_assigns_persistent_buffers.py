"""load_nf4_model loads a checkpoint's persistent buffers as transformers does: DeepSeek-V3's router keeps its
score-correction bias in a buffer (fp32, `_keep_in_fp32_modules_strict`), trained like a weight. It must take the
checkpoint's values in its own dtype, not stay at its initial zeros with the tensor dropped as unexpected."""
import warnings

import pytest
import torch

import fastft

transformers = pytest.importorskip("transformers")


def test_a_routers_buffer_loads_its_values_in_fp32(tmp_path):
    torch.manual_seed(0)
    config = transformers.DeepseekV3Config(
        vocab_size=96, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1,
        first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8,
        v_head_dim=16, n_group=1, topk_group=1, max_position_embeddings=64)
    model = transformers.DeepseekV3ForCausalLM(config)
    name = "model.layers.1.mlp.gate.e_score_correction_bias"
    assert name in dict(model.named_buffers())  # a buffer, saved with the weights
    bias = torch.tensor([0.125, -0.5, 1.0 + 2 ** -20, 0.25])  # 1 + 2**-20: not a bf16 value
    model.get_buffer(name).copy_(bias)
    model.save_pretrained(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = fastft.load_nf4_model(str(tmp_path), dtype=torch.bfloat16)
    assert not [str(w.message) for w in caught if "load_nf4_model" in str(w.message)]  # nothing dropped
    got = loaded.get_buffer(name)
    assert got.dtype == torch.float32 and torch.equal(got, bias)
