"""DoRA's torch path (the CPU default; on a GPU any lora_dropout > 0, and QDoRA) ran its rank path x·Aᵀ·Bᵀ in fp16 for
an fp16 base, where peft runs it in its fp32 adapters' dtype (as fastft's LoRA torch path does, lora.rank_dtype): a
row with |x·Aᵀ| past 65504 gave NaN where peft's output is finite, and the adapter gradients of an fp16 tiny Llama
overflowed at a loss scale 4-8× below peft's."""
import copy

import peft
import pytest
import torch
from torch import nn

import fastft
from tests.utils import first_inf_loss_scale, tiny_llama

M, K, N, R = 5, 64, 48, 4


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(K, N, bias=False)

    def forward(self, x):
        return self.lin(x)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_a_row_past_fp16s_range_in_x_a_stays_finite_as_peft(monkeypatch, dropout):
    monkeypatch.setenv("FASTFT_LORA_BACKEND", "torch")
    g = torch.Generator().manual_seed(0)
    x = torch.rand(M, K, generator=g) * 2 - 1
    x[2] = 3000.0  # with A = 1: x·Aᵀ = 1.9e5 in that row; B = 0 (peft's init) makes the LoRA term 0
    net = _Net()
    with torch.no_grad():
        net.lin.weight.copy_(torch.randn(N, K, generator=g) * 0.01)
    outs = []
    for make in (peft.get_peft_model, fastft.get_peft_model):
        model = make(copy.deepcopy(net).half(), peft.LoraConfig(r=R, lora_alpha=2, target_modules=["lin"],
                                                                  use_dora=True, lora_dropout=dropout))
        layer = model.base_model.model.lin
        with torch.no_grad():
            layer.lora_A["default"].weight.fill_(1.0)
        model.train(dropout > 0)  # with dropout the mask differs between the two; rows stay finite
        xg = x.half().requires_grad_()
        y = model(xg)
        y.float().sum().backward()
        outs.append((y.detach(), layer.lora_B["default"].weight.grad))
    (y_peft, dB_peft), (y_ours, dB_ours) = outs
    assert torch.isfinite(y_peft).all() and torch.isfinite(dB_peft).all()
    assert torch.isfinite(y_ours).all() and torch.isfinite(dB_ours).all()
    if dropout == 0.0:
        torch.testing.assert_close(y_ours, y_peft, rtol=2e-3, atol=1e-2)


def test_tiny_llama_fp16_dora_first_inf_no_earlier_than_peft(monkeypatch):
    monkeypatch.setenv("FASTFT_LORA_BACKEND", "torch")
    base = tiny_llama().half()
    config = peft.LoraConfig(r=4, lora_alpha=64, target_modules="all-linear", use_dora=True,
                             init_lora_weights=False)
    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(3))

    def first_inf(make):
        torch.manual_seed(4)  # init_lora_weights=False draws B: the same factors for both
        return first_inf_loss_scale(make(copy.deepcopy(base), copy.deepcopy(config)), ids, range(14, 26))

    peft_k, ours_k = first_inf(peft.get_peft_model), first_inf(fastft.get_peft_model)
    assert peft_k < 26, "the setup must reach an overflow for the comparison to mean anything"
    assert ours_k >= peft_k, f"fastft's gradients are inf from a loss scale of 2^{ours_k}, peft's from 2^{peft_k}"
