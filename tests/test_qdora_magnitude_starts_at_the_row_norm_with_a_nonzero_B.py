"""QDoRA's magnitude starts at ‖W + s·B·A‖ per row, as peft's DoRA initialises it, with s the adapter's scaling:
with init_lora_weights=False B starts nonzero, so s shows. Mutation run 18: the NF4 variant's init taking s = 1
passed every test (the others start at B = 0, where s drops out). Against the fp64 norm of the dequantized weight."""
import torch
from peft import LoraConfig

import fastft
from fastft.integration.methods.dora import FusedQDoraLinear
from tests.utils import ALL_LINEAR, assert_close, tiny_llama


def test_magnitude_with_a_nonzero_B_and_scaling_4():
    model = fastft.quantize_model(tiny_llama(), "nf4")
    config = LoraConfig(r=4, lora_alpha=16, target_modules=ALL_LINEAR, use_dora=True, init_lora_weights=False,
                        task_type="CAUSAL_LM")
    layer = next(m for m in fastft.get_peft_model(model, config).modules() if isinstance(m, FusedQDoraLinear))
    W = layer.get_base_layer().weight.dequantize(torch.float32).double()
    A, B = (layer.lora_A["default"].weight.double(), layer.lora_B["default"].weight.double())
    s = layer.scaling["default"]
    assert s == 4 and B.abs().max() > 0
    want = torch.linalg.norm(W + s * B @ A, dim=1)
    assert_close(layer.lora_magnitude_vector["default"].weight.detach(), want, torch.float32, "magnitude")
