"""dora_linear's torch path (the CPU default) against fp64: σ = m/‖W'‖ is divided in the wider dtype (a bf16/fp16
magnitude over the fp32 norm was rounded to the magnitude's dtype: 1.6e-3 off in fp32, where peft's promotion and
the Triton path are ~1e-7), and fp64 operands get an fp64 row norm, also under a bf16 autocast (it was summed in
fp32, and its B·A ran in bf16 under autocast: 2.7e-4 off where peft's fp64 DoRA is exact)."""
import copy
import warnings

import peft
import pytest
import torch

import fastft
from fastft.ops.dora import dora_linear, dora_row_norm


def _operands(dtype, generator):
    K, N, r, s = 64, 48, 4, 0.5
    x = torch.randn(8, K, generator=generator, dtype=dtype)
    W = torch.randn(N, K, generator=generator, dtype=dtype) / 8
    b = torch.randn(N, generator=generator, dtype=dtype)
    A = torch.randn(r, K, generator=generator, dtype=dtype) / 4
    B = torch.randn(N, r, generator=generator, dtype=dtype) / 4
    return x, W, b, A, B, s


def _fp64_truth(x, W, b, A, B, m, s):
    x, W, b, A, B, m = (t.double() for t in (x, W, b, A, B, m))
    return (m / torch.linalg.norm(W + s * B @ A, dim=1)) * (x @ W.T + s * (x @ A.T) @ B.T) + b


def _rel(got, want):
    return ((got.double() - want).norm() / want.norm()).item()


@pytest.mark.parametrize("magnitude_dtype", [torch.bfloat16, torch.float16])
def test_a_half_magnitude_over_fp32_operands_keeps_sigma_in_fp32(magnitude_dtype):
    g = torch.Generator().manual_seed(0)
    x, W, b, A, B, s = _operands(torch.float32, g)
    m = (torch.linalg.norm(W + s * B @ A, dim=1) * (1 + 0.1 * torch.randn(W.shape[0], generator=g))).to(magnitude_dtype)
    m.requires_grad_()
    y = dora_linear(x, W, b, A, B, m, s, backend="torch")
    assert y.dtype == torch.float32
    assert _rel(y, _fp64_truth(x, W, b, A, B, m, s)) < 1e-6  # was 1.6e-3 (bf16), 2.7e-4 (fp16)
    y.sum().backward()
    assert m.grad.dtype == magnitude_dtype


@pytest.mark.parametrize("autocast", [False, True])
def test_fp64_operands_get_an_fp64_row_norm(autocast):
    g = torch.Generator().manual_seed(1)
    x, W, b, A, B, s = _operands(torch.float64, g)
    m = torch.linalg.norm(W + s * B @ A, dim=1) * (1 + 0.1 * torch.randn(W.shape[0], generator=g, dtype=torch.float64))
    want = _fp64_truth(x, W, b, A, B, m, s)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        norm = dora_row_norm(W, A, B, s, dtype=torch.float64, backend="torch")
        y = dora_linear(x, W, b, A, B, m, s)
    assert norm.dtype == torch.float64
    torch.testing.assert_close(norm, torch.linalg.norm(W + s * B @ A, dim=1), rtol=1e-13, atol=0)
    assert y.dtype == torch.float64 and _rel(y, want) < 1e-13  # was 3e-8 (fp32 norm), 2.7e-4 under autocast


def test_an_fp64_dora_model_under_bf16_autocast_matches_peft():
    """autocast leaves fp64 ops alone, so peft's fp64 DoRA layer gives its fp64 output under it."""
    g = torch.Generator().manual_seed(2)
    layer = torch.nn.Sequential(torch.nn.Linear(64, 48)).double()
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["0"], use_dora=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = peft.get_peft_model(copy.deepcopy(layer), copy.deepcopy(config))
        ours = fastft.get_peft_model(copy.deepcopy(layer), copy.deepcopy(config))
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(8, 64, generator=g, dtype=torch.float64)
    want = ref(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = ours(x)
    assert _rel(got, want.double()) < 1e-13  # was 1.3e-3
