"""NF4 loading and saving against transformers + bitsandbytes (audit round 4):
- save_nf4_model of a model with every linear NF4 wrote llm_int8_skip_modules=None, which transformers reads as "its
  default skips" (lm_head): it built a dense head and failed on the NF4 one. Now [] (nothing but what the model
  keeps in fp32).
- load_nf4_model(dtype=fp16) left out transformers' fp16 rule for _keep_in_fp32_modules (T5's wo loaded fp16;
  transformers, with or without bitsandbytes, keeps it fp32).
- NF4Linear.load_state_dict of a dense GPT-2 (Conv1D) state dict quantized the (in, out) weight as stored: a square
  layer silently loaded Wᵀ, the others raised a transposed-shape ValueError partway through the load.
- load_nf4_model(use_default_skip=False) of a tied checkpoint left the head dense (quantize_model quantizes it).
- quantize_model on a model bitsandbytes had quantized said it "left 14 layer(s) dense" and returned it unchanged
  (its NF4 layers are taken as they are since: tests/test_bitsandbytes_nf4_model_runs_fastft_kernels.py; FP4 ones
  are refused).
"""
import json

import pytest
import torch
import transformers
from torch import nn

import fastft
from fastft.modules.nf4_linear import NF4Linear
from tests.utils import tiny_llama

IDS = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(0))


def test_a_model_with_every_linear_nf4_saves_a_checkpoint_transformers_loads(tmp_path):
    # intermediate 128: bitsandbytes 0.50's CPU layer fails on widths that are no multiple of the blocksize
    model = fastft.quantize_model(tiny_llama(tie_word_embeddings=False, intermediate_size=128), "nf4",
                                  use_default_skip=False)
    assert isinstance(model.lm_head, NF4Linear)
    fastft.save_nf4_model(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert config["llm_int8_skip_modules"] == []
    bnb = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)  # failed: a dense lm_head for NF4 weights
    assert type(bnb.lm_head).__name__ == "Linear4bit"
    with torch.no_grad():
        want = model(IDS).logits
        assert (bnb(IDS).logits.float() - want).abs().max() < 2e-2  # bitsandbytes' CPU layer computes in bf16
        assert torch.equal(fastft.load_nf4_model(str(tmp_path), dtype=torch.float32)(IDS).logits, want)


def test_fp16_load_keeps_the_models_fp32_modules_as_transformers_does(tmp_path):
    torch.manual_seed(0)
    t5 = transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4, decoder_start_token_id=0))
    t5.save_pretrained(tmp_path)
    plain = transformers.AutoModelForSeq2SeqLM.from_pretrained(tmp_path, dtype=torch.float16)
    ours = fastft.load_nf4_model(str(tmp_path), model_cls=transformers.AutoModelForSeq2SeqLM, dtype=torch.float16)
    for stack in ("encoder", "decoder"):
        wo = getattr(ours, stack).block[0].layer[-1].DenseReluDense.wo
        assert type(wo) is nn.Linear and wo.weight.dtype == torch.float32  # was fp16
        assert wo.weight.dtype == getattr(plain, stack).block[0].layer[-1].DenseReluDense.wo.weight.dtype
    assert isinstance(ours.encoder.block[0].layer[0].SelfAttention.q, NF4Linear)  # the rest as before: NF4, fp16
    assert ours.shared.weight.dtype == torch.float16
    bf16 = fastft.load_nf4_model(str(tmp_path), model_cls=transformers.AutoModelForSeq2SeqLM, dtype=torch.bfloat16)
    assert bf16.encoder.block[0].layer[-1].DenseReluDense.wo.weight.dtype == torch.bfloat16  # fp16's rule only


@pytest.mark.parametrize("skip", [[], ["c_attn", "mlp"]], ids=["every-layer", "square-c_proj-only"])
def test_a_dense_gpt2_state_dict_loads_into_its_nf4_layers_in_the_conv1d_layout(skip):
    config = transformers.GPT2Config(vocab_size=128, n_embd=64, n_layer=1, n_head=4, n_positions=32)

    def gpt2(seed):
        torch.manual_seed(seed)
        return transformers.GPT2LMHeadModel(config).eval()

    want = fastft.quantize_model(gpt2(0), "nf4", skip=skip)
    loaded = fastft.quantize_model(gpt2(1), "nf4", skip=skip)
    loaded.load_state_dict(gpt2(0).state_dict())
    for name, module in want.named_modules():
        if isinstance(module, NF4Linear):
            assert torch.equal(loaded.get_submodule(name).weight.dequantize(), module.weight.dequantize()), name
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, want(IDS).logits)


def test_a_wrong_shaped_dense_weight_is_a_size_mismatch_not_an_error_partway():
    layer = NF4Linear.from_linear(nn.Linear(64, 32))
    before = layer.weight.dequantize()
    with pytest.raises(RuntimeError, match=r"size mismatch for weight: the checkpoint's weight is \(32, 96\)"):
        layer.load_state_dict({"weight": torch.randn(32, 96), "bias": torch.zeros(32)})
    assert torch.equal(layer.weight.dequantize(), before)


def test_a_tied_head_is_quantized_on_load_without_default_skips_as_quantize_model_does(tmp_path):
    tiny_llama(tie_word_embeddings=True).save_pretrained(tmp_path)
    want = fastft.quantize_model(tiny_llama(tie_word_embeddings=True), "nf4", use_default_skip=False)
    loaded = fastft.load_nf4_model(str(tmp_path), dtype=torch.float32, use_default_skip=False)
    assert isinstance(loaded.lm_head, NF4Linear) and isinstance(want.lm_head, NF4Linear)
    assert type(fastft.load_nf4_model(str(tmp_path), dtype=torch.float32).lm_head) is nn.Linear  # the default
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, want(IDS).logits)


def test_quantize_model_refuses_a_model_bitsandbytes_quantized_in_fp4(tmp_path):
    tiny_llama(tie_word_embeddings=False).save_pretrained(tmp_path)
    bnb = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, quantization_config=transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="fp4"))
    with pytest.raises(TypeError, match=r"q_proj is a Linear4bit whose weight is torch.uint8.*quantized already.*FP4"):
        fastft.quantize_model(bnb, "nf4")
