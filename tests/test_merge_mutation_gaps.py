"""Merges and reloads a mutation run found no test pinning: merge_adapter twice (peft's "already merged") or after
peft unmerged the layers itself keeps the tied embedding right; fastft.merge_and_unload of a model peft built unties
a LoRA-adapted tied head; a QLoRA merge gives frozen dense layers in the model's dtype, a layer shared under two
names stays one layer; an adapter of other targets is not reloaded into an existing one."""
import warnings

import peft
import pytest
import torch
from peft import LoraConfig

import fastft
from tests.utils import randomize_lora_B, tiny_llama

IDS = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))


def _logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits.float()


def _tied_head_lora():
    model = fastft.get_peft_model(tiny_llama(tie_word_embeddings=True),
                                  LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"]))
    randomize_lora_B(model)
    return model


def _tied(model):
    base = model.get_base_model()
    return base.lm_head.base_layer.weight is base.model.embed_tokens.weight


def test_merge_adapter_twice_then_unmerge_restores_the_tied_embedding():
    model = _tied_head_lora()
    embedding = model.get_base_model().model.embed_tokens.weight.detach().clone()
    adapted = _logits(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft: "All adapters are already merged"
        model.merge_adapter()
        model.merge_adapter()
    assert torch.allclose(_logits(model), adapted, atol=1e-5)
    model.unmerge_adapter()
    assert torch.allclose(model.get_base_model().model.embed_tokens.weight, embedding, atol=1e-6)
    assert torch.allclose(_logits(model), adapted, atol=1e-5) and _tied(model)


def test_merge_adapter_after_peft_unmerged_the_layers_reads_the_trained_embedding():
    model = _tied_head_lora()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.merge_adapter()
        for module in model.modules():  # what peft's set_adapter does to merged layers
            if hasattr(module, "unmerge") and getattr(module, "merged", False):
                module.unmerge()
        with torch.no_grad():
            model.get_base_model().model.embed_tokens.weight.add_(0.05)  # a training step on the embedding
        model.merge_adapter()
        merged = _logits(model)
        model.unmerge_adapter()
    assert _tied(model) and torch.allclose(merged, _logits(model), atol=1e-5)


def test_merge_and_unload_of_a_model_peft_built_unties_the_adapted_head():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        made = peft.get_peft_model(tiny_llama(tie_word_embeddings=True),
                                   LoraConfig(r=4, target_modules=["q_proj", "lm_head"]))
    randomize_lora_B(made)
    adapted = _logits(made)
    merged = fastft.merge_and_unload(made)
    assert torch.allclose(_logits(merged), adapted, atol=1e-5) and merged.config.tie_word_embeddings is False


@pytest.mark.parametrize("quantized_from", [torch.bfloat16, torch.float32])
def test_a_qlora_merge_gives_frozen_dense_layers_in_the_models_dtype(quantized_from):
    model = tiny_llama().to(quantized_from)
    mlp = model.model.layers[0].mlp
    mlp.extra = mlp.up_proj  # one layer under two names
    fastft.quantize_model(model)
    model.to(torch.bfloat16)  # fp32-quantized: the model cast to bf16 afterwards
    qlora = fastft.get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    randomize_lora_B(qlora)
    adapted = _logits(qlora)
    merged = fastft.merge_and_unload(qlora)
    layer = merged.model.layers[0]
    assert type(layer.self_attn.q_proj) is torch.nn.Linear and layer.self_attn.q_proj.weight.dtype == torch.bfloat16
    assert not any(p.requires_grad for p in merged.parameters())
    assert layer.mlp.up_proj is layer.mlp.extra and type(layer.mlp.up_proj) is torch.nn.Linear
    assert (_logits(merged) - adapted).abs().max() <= 2e-2  # bf16 rounding of the merged weights


def test_an_adapter_of_other_targets_is_not_reloaded_into_an_existing_one(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft.get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "k_proj"])).save_pretrained(
            tmp_path)
    model = fastft.get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    with pytest.raises(ValueError, match="holds an adapter with target_modules=.*but the model's adapter 'default'"):
        fastft.load_adapter(model, tmp_path, adapter_name="default")
