"""fastft.merge_and_unload on a QLoRA model dequantizes every NF4 layer into a fresh nn.Linear: those came back with
requires_grad=True (all 14 linears of a tiny Llama, adapted or not), so an optimizer built from a requires_grad
filter, or a trainable-parameter count, silently took them in; peft's merge (and fastft's dense one) leave the base
frozen. NF4Linear.to_linear keeps the layer's own frozen / trainable state."""
import warnings

from peft import LoraConfig

import fastft
from fastft.modules.nf4_linear import NF4Linear
from tests.utils import tiny_llama


def test_merged_qlora_model_has_no_trainable_parameters():
    model = fastft.quantize_model(tiny_llama(), "nf4")
    peft_model = fastft.get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged = fastft.merge_and_unload(peft_model)
    assert not any(isinstance(m, NF4Linear) for m in merged.modules())
    assert [n for n, p in merged.named_parameters() if p.requires_grad] == []


def test_to_linear_keeps_a_trainable_bias_trainable():
    import torch

    layer = NF4Linear.from_linear(torch.nn.Linear(64, 32))
    layer.bias.requires_grad_(True)
    dense = layer.to_linear()
    assert not dense.weight.requires_grad and dense.bias.requires_grad
    layer.bias.requires_grad_(False)
    assert not layer.to_linear().bias.requires_grad
