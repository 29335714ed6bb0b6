"""A LoRA lm_head whose adapter was merged into the base weight (peft's merge_adapter()): the fused loss reads the
base weight, which already holds ΔW, and must not add the LoRA term a second time."""
import peft
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastft
from fastft.ops.linear_losses import lm_head_cross_entropy


class _Holder(nn.Module):
    def __init__(self, lm_head):
        super().__init__()
        self.lm_head = lm_head


@pytest.mark.parametrize("build", ["peft", "fastft"])
def test_merged_lora_head_counts_the_adapter_once(build, monkeypatch):
    monkeypatch.setenv("FASTFT_LORA_BACKEND", "torch")
    torch.manual_seed(0)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["lm_head"])
    model = (peft.get_peft_model if build == "peft" else fastft.get_peft_model)(_Holder(nn.Linear(24, 53)), config)
    head = model.base_model.model.lm_head
    with torch.no_grad():
        head.lora_B["default"].weight.normal_(std=0.5)  # a ΔW that moves the loss
    hidden, labels = torch.randn(3, 7, 24), torch.randint(0, 53, (3, 7))
    unmerged = lm_head_cross_entropy(hidden, head, labels)
    model.merge_adapter()
    assert head.merged
    with torch.no_grad():
        ref = F.cross_entropy(head(hidden).reshape(-1, 53).float(), labels.reshape(-1))
        loss = lm_head_cross_entropy(hidden, head, labels)
    assert torch.allclose(ref, unmerged.detach(), rtol=1e-4, atol=1e-5)  # merging changes nothing peft computes
    assert torch.allclose(loss, ref, rtol=1e-4, atol=1e-5)
