"""LoraConfig.lora_dropout must be a probability in [0, 1): at 1 every LoRA input is dropped (and the fused kernels'
1/(1-p) is infinite), so the adapter would never train."""
import pytest
from peft import LoraConfig

import fastft
from tests.utils import tiny_llama


@pytest.mark.parametrize("p", [1.0, 1.5, -0.1])
def test_lora_dropout_outside_zero_one_is_refused(p):
    with pytest.raises(ValueError, match=r"lora_dropout.*\[0, 1\)"):
        fastft.get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"], lora_dropout=p))


def test_lora_dropout_just_below_one_is_accepted():
    model = fastft.get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"], lora_dropout=0.99))
    assert model.peft_config["default"].lora_dropout == 0.99
