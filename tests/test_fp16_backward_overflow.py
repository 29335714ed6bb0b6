"""An fp16 base model with peft's fp32 adapters (autocast_adapter_dtype), no autocast, a GradScaler-scaled backward:
fastft's torch backend must overflow (inf gradients: the scaler skips the step and backs off) at no lower loss scale
than peft, with gradients at least as accurate against fp64. Its rank path used to run in fp16: autograd's
dA = (s·dy·B)ᵀ·x, a sum over every row, was inf 4 octaves of loss scale before peft's fp32 one (2 on a tiny Llama)."""
import copy

import peft
import pytest
import torch
import torch.nn.functional as F

import fastft
from fastft.ops import lora_linear
from tests.utils import TOL, first_inf_loss_scale, rel_err, tiny_llama

M, K, N, R, ALPHA = 256, 32, 24, 4, 16  # s = 4: peft's first inf at a loss scale of 2^13, the old torch path's 2^9


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(K, N)

    def forward(self, x):
        return self.proj(x)


def _pair(adapters_fp16: bool):
    """(peft model, fastft model) over one fp16 Linear with the same random factors (B nonzero)."""
    g = torch.Generator().manual_seed(0)
    net = _Net()
    with torch.no_grad():
        net.proj.weight.copy_(torch.randn(N, K, generator=g) * K**-0.5)
        net.proj.bias.copy_(torch.randn(N, generator=g) * 0.1)
    net = net.half()
    A, B = torch.randn(R, K, generator=g) * K**-0.5, torch.randn(N, R, generator=g) * 0.3
    config = peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["proj"])
    models = []
    for make in (peft.get_peft_model, fastft.get_peft_model):
        model = make(copy.deepcopy(net), copy.deepcopy(config))
        layer = model.base_model.model.proj
        with torch.no_grad():
            layer.lora_A["default"].weight.copy_(A)
            layer.lora_B["default"].weight.copy_(B)
        models.append(model.half() if adapters_fp16 else model)
    return models


def _inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(M, K, generator=g).half(), torch.randn(M, N, generator=g)


def _grads(model, x, direction, loss_scale):
    """(y, dx, dA, dB) of loss_scale·⟨y, direction⟩."""
    layer = model.base_model.model.proj
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    A.grad = B.grad = None
    x = x.clone().requires_grad_()
    y = model(x)
    (y.float() * direction).sum().mul(loss_scale).backward()
    return y.detach(), x.grad, A.grad, B.grad


def _first_inf(model, x, direction) -> int:
    """The first k in 0..29 whose loss scale 2^k gives an inf/nan gradient (GradScaler's found_inf)."""
    return next((k for k in range(30)
                 if not all(torch.isfinite(t).all() for t in _grads(model, x, direction, 2.0**k)[1:])), 30)


def _fp64(model, x, direction):
    """y, dx, dA, dB in fp64 from the model's own (fp16-rounded) weights."""
    layer = model.base_model.model.proj
    W, b = layer.base_layer.weight.double(), layer.base_layer.bias.double()
    x, A, B = (t.detach().double().requires_grad_() for t in (x, layer.lora_A["default"].weight,
                                                              layer.lora_B["default"].weight))
    y = F.linear(x, W, b) + (ALPHA / R) * F.linear(F.linear(x, A), B)
    (y * direction.double()).sum().backward()
    return y, x.grad, A.grad, B.grad


@pytest.mark.parametrize("adapters_fp16", [False, True], ids=["fp32-adapters", "fp16-adapters"])
def test_torch_backend_overflows_no_earlier_than_peft(monkeypatch, adapters_fp16):
    monkeypatch.setenv("FASTFT_LORA_BACKEND", "torch")
    ref, ours = _pair(adapters_fp16)
    x, direction = _inputs()
    peft_k, ours_k = _first_inf(ref, x, direction), _first_inf(ours, x, direction)
    assert peft_k < 30, "the setup must reach an overflow for the comparison to mean anything"
    assert ours_k >= peft_k, f"fastft's gradients are inf from a loss scale of 2^{ours_k}, peft's from 2^{peft_k}"


@pytest.mark.parametrize("adapters_fp16", [False, True], ids=["fp32-adapters", "fp16-adapters"])
@pytest.mark.parametrize("large_scale", [False, True], ids=["scale-1", "below-peft-inf"])
def test_torch_backend_fp16_accuracy(monkeypatch, adapters_fp16, large_scale):
    monkeypatch.setenv("FASTFT_LORA_BACKEND", "torch")
    ref, ours = _pair(adapters_fp16)
    x, direction = _inputs()
    loss_scale = 2.0 ** (_first_inf(ref, x, direction) - 1) if large_scale else 1.0
    truth = _fp64(ours, x, direction)
    for name, a, b, t in zip(("y", "dx", "dA", "dB"), _grads(ref, x, direction, loss_scale),
                             _grads(ours, x, direction, loss_scale), truth):
        scale = 1.0 if name == "y" else loss_scale
        peft_err, ours_err = rel_err(a, t * scale), rel_err(b, t * scale)
        assert ours_err <= TOL[torch.float16], f"{name}: relative error {ours_err:.2e} vs fp64"
        assert ours_err <= 1.05 * peft_err + 1e-6, f"{name}: relative error {ours_err:.2e}, peft's {peft_err:.2e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_backend_rank_path_keeps_other_dtypes(dtype):
    """bf16 and fp32 inputs: the rank path in the inputs' own dtype, bit for bit (only fp16's moved to fp32)."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(9, 16, generator=g).to(dtype)
    W = torch.randn(12, 16, generator=g).to(dtype)
    A = torch.randn(4, 16, generator=g).requires_grad_()
    B = torch.randn(12, 4, generator=g).requires_grad_()
    y = lora_linear(x, W, None, A, B, 2.5, backend="torch")
    expected = F.linear(x, W) + 2.5 * F.linear(F.linear(x, A.to(dtype)), B.to(dtype))
    assert y.dtype == dtype and torch.equal(y, expected)


def test_tiny_llama_fp16_first_inf_no_earlier_than_peft(monkeypatch):
    """The model-level symptom: one scaled backward per loss scale on an fp16 tiny Llama, all-linear r=4 alpha=16."""
    monkeypatch.setenv("FASTFT_LORA_BACKEND", "torch")
    base = tiny_llama().half()
    config = peft.LoraConfig(r=4, lora_alpha=16, target_modules="all-linear", init_lora_weights=False)
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(3))

    def first_inf(make):
        torch.manual_seed(4)  # init_lora_weights=False draws B: the same factors for both
        return first_inf_loss_scale(make(copy.deepcopy(base), copy.deepcopy(config)), ids, range(16, 26))

    peft_k, ours_k = first_inf(peft.get_peft_model), first_inf(fastft.get_peft_model)
    assert peft_k < 26
    assert ours_k >= peft_k, f"fastft's gradients are inf from a loss scale of 2^{ours_k}, peft's from 2^{peft_k}"
