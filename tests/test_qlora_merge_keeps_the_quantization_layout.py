"""Merging an adapter into an NF4 base re-quantizes with the base's own blocksize and double quantization: a
double_quant=False, blocksize-128 base stays so (not bitsandbytes' defaults), bit for bit quantize_nf4 of the sum."""

import torch
from peft import LoraConfig

import fastft
from fastft.quant import quantize_nf4
from tests.utils import randomize_lora_B, tiny_llama


def test_merge_keeps_blocksize_and_no_double_quant():
    quantized = fastft.quantize_model(tiny_llama(), "nf4", blocksize=128, double_quant=False)
    model = fastft.get_peft_model(quantized, LoraConfig(r=4, lora_alpha=8, target_modules=["v_proj"]))
    randomize_lora_B(model)
    layer = model.base_model.model.model.layers[0].self_attn.v_proj
    before = layer.base_layer.weight.dequantize(torch.float32)
    delta = layer.get_delta_weight("default").float()
    model.merge_adapter()
    w = layer.base_layer.weight
    assert (w.blocksize, w.double_quant) == (128, False)
    want = quantize_nf4(before + delta, blocksize=128, double_quant=False)
    assert torch.equal(w.packed, want.packed) and torch.equal(w.absmax, want.absmax)
