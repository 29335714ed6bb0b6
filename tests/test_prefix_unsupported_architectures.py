"""fastft prefix tuning refuses the architectures where the prefix handed to the attention op beside the cache is not
peft's prefix (found by the round-13 registry sweep, docs/fuzz-results.md), and stops a forward whose layers drop the
prefix on the way to the attention.

Before, each of these built silently and ran another model: StableLM's decoder layers drop keyword arguments (the
prefix never reached the attention: outputs equal the base model's), DiffLlama splits its cached values in two and
Doge biases each cached key by its value (the prefix got neither), HRM-Text applies each attention module several
times with a cache slot each, the BART-family decoders count positions from their cache (the real tokens sat at 0..
instead of after the prefix), multi-head-latent-attention models stopped mid-forward with the op's shape error, and
a model whose attention ignores set_attn_implementation generated without its prefix."""
import pytest
import torch
import transformers as T

from fastft.integration.methods import MethodOptions, apply_method

LLAMA_LIKE = dict(vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64)


def _stablelm():
    return T.StableLmForCausalLM(T.StableLmConfig(**LLAMA_LIKE))


def _diffllama():
    return T.DiffLlamaForCausalLM(T.DiffLlamaConfig(**LLAMA_LIKE))


def _doge():
    return T.DogeForCausalLM(T.DogeConfig(**LLAMA_LIKE))


def _bart():
    return T.BartForCausalLM(T.BartConfig(vocab_size=128, d_model=32, encoder_layers=2, decoder_layers=2,
                                          encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                                          decoder_ffn_dim=64, max_position_embeddings=64))


def _deepseek_v3():  # multi-head latent attention: keys 16 wide (8 + 8 rope), values 8
    return T.DeepseekV3ForCausalLM(T.DeepseekV3Config(
        vocab_size=128, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8,
        qk_nope_head_dim=8, v_head_dim=8, head_dim=8, n_routed_experts=4, num_experts_per_tok=2, n_group=1,
        topk_group=1, first_k_dense_replace=1, max_position_embeddings=64))


@pytest.mark.parametrize("make, why", [
    (_stablelm, "do not pass keyword arguments"),
    (_diffllama, "splits the cached values"),
    (_doge, "biases each cached key"),
    (_bart, "takes no position_ids"),
    (_deepseek_v3, "multi-head latent attention"),
], ids=["stablelm", "diffllama", "doge", "bart", "deepseek_v3"])
def test_prefix_tuning_refuses_architectures_it_would_run_wrong(make, why):
    torch.manual_seed(0)
    with pytest.raises(ValueError, match=f"fastft prefix tuning does not support .*{why}.*use peft's own"):
        apply_method(make(), "prefix", MethodOptions(num_virtual_tokens=3))


def test_prefix_tuning_refuses_hrm_texts_recurrent_stack():
    config_class = T.CONFIG_MAPPING["hrm_text"]
    model_class = T.MODEL_FOR_CAUSAL_LM_MAPPING[config_class]
    # the defaults, shrunk: the attention modules are applied once a cycle, each cycle with its own cache slot
    config = config_class(vocab_size=128, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=8, max_position_embeddings=64)
    with pytest.raises(ValueError, match="applies each attention module several times"):
        apply_method(model_class(config), "prefix", MethodOptions(num_virtual_tokens=3))


def _llama():
    torch.manual_seed(0)
    return T.LlamaForCausalLM(T.LlamaConfig(**LLAMA_LIKE))


def _drop_prefix_keyword(layer):
    """The decoder layer as StableLM's is written: the keyword arguments stop there."""
    forward = layer.forward

    def without_prefix(*args, **kwargs):
        kwargs.pop("fastft_prefix", None)
        return forward(*args, **kwargs)

    layer.forward = without_prefix


def test_a_layer_that_drops_the_prefix_stops_the_forward_and_generate():
    model = apply_method(_llama(), "prefix", MethodOptions(num_virtual_tokens=3))
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(1))
    model(input_ids=ids).logits.sum().backward()  # every layer gets the prefix: runs
    _drop_prefix_keyword(model.get_base_model().model.layers[1])
    with pytest.raises(ValueError, match="called without the prefix"):
        model(input_ids=ids)
    with pytest.raises(ValueError, match="called without the prefix"):
        model.generate(input_ids=ids[:1], max_new_tokens=2, do_sample=False)
    with model.disable_adapter():  # the base model alone: no prefix expected
        model(input_ids=ids)
    model.get_base_model()(input_ids=ids)  # outside the prefix model's forward: none expected either


def test_an_attention_that_ignores_fastft_is_refused(monkeypatch):
    """transformers only logs that a hand-written attention (MVP's, GOT-OCR2's vision tower) cannot switch
    implementation; the prefix room then generated through an attention that never sees its prefix."""
    monkeypatch.setattr(T.LlamaForCausalLM, "set_attn_implementation", lambda self, name: None)
    with pytest.raises(ValueError, match="does not take attn_implementation='fastft'"):
        apply_method(_llama(), "prefix", MethodOptions(num_virtual_tokens=3))
