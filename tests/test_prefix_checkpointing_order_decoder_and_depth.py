"""Prefix tuning, three cases the round-15 registry sweep found (docs/fuzz-results.md):

- gradient checkpointing switched on *before* fastft.get_peft_model (the usual order) was refused with peft's own
  "PREFIX_TUNING does not work with gradient checkpointing", although fastft's prefix runs under non-reentrant
  checkpointing (switched on after, it was accepted and exact);
- a multimodal model whose top config keeps its vision tower's attention (GOT-OCR2: "eager") while the text decoder
  runs fastft: the forward silently took peft's own prefix path (and failed under checkpointing), and generate put
  the decoder back to eager;
- Whisper's decoder, deeper than its encoder: peft sizes the prefix by config.num_hidden_layers (the encoder's), and
  the forward stopped with a bare IndexError."""
import copy

import peft
import pytest
import torch
import transformers as T

import fastft
from fastft.integration.methods import prefix as prefix_room

IDS = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(0))


def _llama():
    torch.manual_seed(0)
    return T.LlamaForCausalLM(T.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))


def _config(**kw):
    return peft.PrefixTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM", **kw)


def _prefix_grad(model):
    model.train()
    model.zero_grad()
    model(input_ids=IDS, labels=IDS).loss.backward()
    return model.prompt_encoder["default"].embedding.weight.grad.clone()


def test_checkpointing_switched_on_before_the_prefix_model_is_kept_and_exact():
    base = _llama()
    torch.manual_seed(5)
    expected = _prefix_grad(fastft.get_peft_model(copy.deepcopy(base), _config()))
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    torch.manual_seed(5)
    model = fastft.get_peft_model(base, _config())
    assert all(layer.gradient_checkpointing for layer in model.get_base_model().model.layers)  # still on
    calls = []
    layer = model.get_base_model().model.layers[0]
    real = layer._gradient_checkpointing_func
    layer._gradient_checkpointing_func = lambda *a, **k: (calls.append(1), real(*a, **k))[1]
    torch.testing.assert_close(_prefix_grad(model), expected, rtol=1e-6, atol=1e-7)
    assert calls  # the layer really ran checkpointed


def test_the_prefix_path_follows_the_text_decoders_attention(monkeypatch):
    """A model whose top config says "eager" while its decoder runs fastft (GOT-OCR2's vision tower) takes fastft's
    prefix path, as the same model with one config does, and generate leaves the decoder on fastft."""
    model = fastft.get_peft_model(_llama(), _config())
    expected = model(input_ids=IDS).logits
    base = model.get_base_model()
    decoder_config = copy.copy(base.config)  # the decoder and its layers: their own config, on fastft
    for module in base.model.modules():
        if getattr(module, "config", None) is base.config:
            module.config = decoder_config
    base.config._attn_implementation_internal = "eager"
    assert base.config._attn_implementation == "eager" and base.model.config._attn_implementation == "fastft"
    monkeypatch.setattr(peft.PeftModelForCausalLM, "forward", lambda *a, **k: pytest.fail("peft's prefix path ran"))
    torch.testing.assert_close(model(input_ids=IDS).logits, expected, rtol=0, atol=0)
    model.generate(input_ids=IDS[:1], max_new_tokens=2, do_sample=False)
    assert base.model.config._attn_implementation == "fastft"


def test_a_decoder_deeper_than_peft_counts_is_refused_naming_num_layers():
    model = T.WhisperForCausalLM(T.WhisperConfig(
        vocab_size=128, d_model=64, encoder_layers=1, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_target_positions=64,
        max_source_positions=64, decoder_start_token_id=0, pad_token_id=0, bos_token_id=0, eos_token_id=0))
    with pytest.raises(ValueError, match=r"num_layers=1 .* fewer than the 2 attention layers of WhisperDecoder.*"
                                         r"PrefixTuningConfig\(num_layers=2"):
        fastft.get_peft_model(copy.deepcopy(model), _config())
    fixed = fastft.get_peft_model(model, _config(num_layers=2))
    assert isinstance(fixed, prefix_room.FastftPrefixModel)
    fixed(input_ids=IDS).logits.sum().backward()
