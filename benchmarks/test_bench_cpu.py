"""CPU benchmarks (pytest-benchmark): the LoRA linear's CPU path against peft's layer and the frozen base,
forward + backward, fp32. `python -m pytest benchmarks` prints the table; CI runs each once
(`--benchmark-disable`) as a smoke test. GPU figures come from benchmarks/gpu_lora.py."""
import peft
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastft.ops import lora_linear

M, K, N, R = 512, 1024, 1024, 16


@pytest.fixture(scope="module")
def tensors():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(M, K, generator=g).requires_grad_()
    dy = torch.randn(M, N, generator=g)
    holder = nn.Sequential()
    holder.add_module("proj", nn.Linear(K, N, bias=False))
    layer = peft.get_peft_model(holder, peft.LoraConfig(r=R, lora_alpha=2 * R, target_modules=["proj"]))
    layer = layer.base_model.model.proj
    nn.init.normal_(layer.lora_B["default"].weight, std=0.02)
    return x, dy, layer


def test_frozen_base(benchmark, tensors):
    x, dy, layer = tensors
    W = layer.base_layer.weight
    benchmark(lambda: torch.autograd.grad(F.linear(x, W), [x], dy))


def test_peft_lora(benchmark, tensors):
    x, dy, layer = tensors
    params = [x, layer.lora_A["default"].weight, layer.lora_B["default"].weight]
    benchmark(lambda: torch.autograd.grad(layer(x), params, dy))


def test_fastft_lora_cpu_path(benchmark, tensors):
    x, dy, layer = tensors
    W, A, B = layer.base_layer.weight, layer.lora_A["default"].weight, layer.lora_B["default"].weight
    grads = benchmark(lambda: torch.autograd.grad(lora_linear(x, W, None, A, B, 2.0), [x, A, B], dy))
    expected = torch.autograd.grad(layer(x), [x, A, B], dy)
    for got, want in zip(grads, expected):
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-5)
