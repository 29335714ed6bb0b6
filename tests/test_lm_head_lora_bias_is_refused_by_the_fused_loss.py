"""lm_head_cross_entropy on a peft LoRA lm_head with lora_bias=True (peft's own get_peft_model takes it) is refused:
the fused loss has no term for lora_B's bias and would return peft's loss without it (3.59 instead of 5.70 here)."""
import pytest
import torch
from peft import LoraConfig, get_peft_model

from fastft.ops import lm_head_cross_entropy


class _Head(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lm_head = torch.nn.Linear(16, 32, bias=False)

    def forward(self, h):
        return self.lm_head(h)


def test_a_lora_bias_head_is_refused():
    torch.manual_seed(0)
    model = get_peft_model(_Head(), LoraConfig(r=4, target_modules=["lm_head"], lora_bias=True,
                                               init_lora_weights=False))
    head = model.base_model.model.lm_head
    with torch.no_grad():
        head.lora_B["default"].bias.normal_()
    h, labels = torch.randn(2, 5, 16), torch.randint(0, 32, (2, 5))
    with pytest.raises(ValueError, match="lora_bias=True"):
        lm_head_cross_entropy(h, head, labels, backend="torch")
