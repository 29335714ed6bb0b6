"""Bottleneck adapters "after the MLP" refuse mixture-of-experts layers, and apply_method's errors name the
MethodOptions field (and the `fastft train` flag) that sets what they complain about.

Found by the round-13 registry sweep (docs/fuzz-results.md): on an MoE with a shared expert (Qwen2-MoE, DeepSeek,
Llama 4, ~30 types) the default mlp_output_modules=("down_proj",) matched the shared expert's down_proj, so the
adapter sat inside the MoE block (its output then gated and added to the routed experts'), not after the MLP; a
model mixing dense and MoE layers got adapters on its dense layers only. Both silently. IA3's and the adapter's
errors named IA3Config / BottleneckAdapterConfig fields a MethodOptions user never sees, and IA3's feed-forward
error suggested 'v_proj' (an attention layer) for 'down_proj'."""
import pytest
import torch
import transformers as T

from fastft.integration.methods import MethodOptions, apply_method


def _qwen2_moe(mlp_only_layers=()):
    torch.manual_seed(0)
    return T.Qwen2MoeForCausalLM(T.Qwen2MoeConfig(
        vocab_size=128, hidden_size=64, intermediate_size=64, moe_intermediate_size=16,
        shared_expert_intermediate_size=32, num_experts=4, num_experts_per_tok=2, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, mlp_only_layers=list(mlp_only_layers)))


@pytest.mark.parametrize("placement", ["pfeiffer", "houlsby"])
def test_adapter_after_an_moe_mlp_is_refused(placement):
    with pytest.raises(ValueError, match="'model.layers.0.mlp' .* is a mixture of experts.*"
                                         "'model.layers.0.mlp.shared_expert.down_proj' inside it"):
        apply_method(_qwen2_moe(), "adapter", MethodOptions(adapter_size=8, adapter_placement=placement))


def test_a_dense_layer_beside_an_moe_layer_does_not_hide_it():
    # layer 0 dense (its mlp.down_proj an adapter could follow), layer 1 MoE: refused, not half adapted
    with pytest.raises(ValueError, match="'model.layers.1.mlp' .* is a mixture of experts"):
        apply_method(_qwen2_moe(mlp_only_layers=[0]), "adapter", MethodOptions(adapter_size=8))


def test_a_regex_places_adapters_inside_the_experts_block_on_purpose():
    model = apply_method(_qwen2_moe(), "adapter", MethodOptions(
        adapter_size=8, adapter_mlp_output_modules=r".*\.shared_expert\.down_proj"))
    placed = [n for n, _ in model.get_base_model().named_modules() if n.endswith(".adapter")]
    assert placed == [f"model.layers.{i}.mlp.shared_expert.down_proj.adapter" for i in range(2)]


def _gpt2():
    torch.manual_seed(0)
    return T.GPT2LMHeadModel(T.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=128, bos_token_id=0,
                                          eos_token_id=0))


def _notes(excinfo) -> str:
    return " ".join(getattr(excinfo.value, "__notes__", []))


def test_ia3_errors_name_the_method_option():
    with pytest.warns(UserWarning), pytest.raises(ValueError) as unmatched:  # Llama's defaults on GPT-2
        apply_method(_gpt2(), "ia3", MethodOptions())
    assert "MethodOptions.ia3_target_modules (fastft train --ia3-target-modules)" in _notes(unmatched)
    with pytest.raises(ValueError) as stray:
        apply_method(_gpt2(), "ia3", MethodOptions(ia3_target_modules=("c_attn", "c_fc", "down_proj"),
                                                   ia3_feedforward_modules=("down_proj",)))
    message = str(stray.value)
    assert "IA3Config.feedforward_modules entries ['down_proj']" in message and "v_proj" not in message
    assert "MethodOptions.ia3_feedforward_modules (fastft train --ia3-feedforward-modules)" in _notes(stray)
    assert "ia3_target_modules" not in _notes(stray)


def test_adapter_errors_name_the_method_option():
    with pytest.raises(ValueError) as unmatched:
        apply_method(_gpt2(), "adapter", MethodOptions(adapter_size=8))
    assert "BottleneckAdapterConfig.mlp_output_modules" in str(unmatched.value)
    assert _notes(unmatched) == ("apply_method('adapter'): set by MethodOptions.adapter_mlp_output_modules "
                                 "(fastft train --adapter-mlp-output-modules)")
