"""Bottleneck adapters "after the MLP" refuse a mixture-of-experts layer the names match nothing in (Qwen3-MoE: no
shared expert, its experts' down_proj a fused parameter, not a module), beside dense layers they do match: the MoE
layers would get no adapter while the dense ones do, silently half adapted. (The Qwen2-MoE tests match the shared
expert's down_proj inside the block, so only a block with a match inside was checked.)"""
import pytest
import torch
import transformers as T

from fastft.integration.methods import MethodOptions, apply_method


def _qwen3_moe(mlp_only_layers):
    torch.manual_seed(0)
    return T.Qwen3MoeForCausalLM(T.Qwen3MoeConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_experts=4,
        num_experts_per_tok=2, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
        max_position_embeddings=64, mlp_only_layers=list(mlp_only_layers)))


@pytest.mark.parametrize("placement", ["pfeiffer", "houlsby"])
def test_an_moe_layer_beside_a_dense_one_is_refused_though_nothing_in_it_matches(placement):
    model = _qwen3_moe(mlp_only_layers=[0])
    assert [n for n, _ in model.named_modules() if n.endswith("down_proj")] == ["model.layers.0.mlp.down_proj"]
    with pytest.raises(ValueError, match="'model.layers.1.mlp' .* is a mixture of experts.*they match nothing in it"):
        apply_method(model, "adapter", MethodOptions(adapter_size=8, adapter_placement=placement))


def test_the_dense_layers_alone_take_adapters_through_a_regex():
    """The refusal's way out: a regex string names the dense layers' down_proj on purpose."""
    model = apply_method(_qwen3_moe(mlp_only_layers=[0]), "adapter", MethodOptions(
        adapter_size=8, adapter_mlp_output_modules=r"model\.layers\.0\.mlp\.down_proj"))
    placed = [n for n, _ in model.get_base_model().named_modules() if n.endswith(".adapter")]
    assert placed == ["model.layers.0.mlp.down_proj.adapter"]
