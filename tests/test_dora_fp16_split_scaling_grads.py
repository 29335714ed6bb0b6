"""dora_linear's fused backward in fp16 with a scaling that split_scaling splits (s = -2 -> a = -1, b = 2): dB must
carry the factor b (dB = b·diag(σ)·dyᵀ·xs). The fuzz's CI examples never drew fp16 with such a scaling on the Triton
path, so dropping b from dB passed every test (a 2× wrong dB in fp16 training with alpha/r = 2, 4, ...)."""
import pytest
import torch

from fastft.ops.dora import dora_linear, dora_linear_reference
from tests.utils import assert_close, interpreter_only


@interpreter_only
@pytest.mark.parametrize("scaling", [-2.0, 4.0, 0.25])
@pytest.mark.parametrize("need_A", [True, False])  # both factors (one launch) or B alone (its own branch)
def test_fp16_fused_dora_grads_with_split_scaling(scaling, need_A):
    g = torch.Generator().manual_seed(0)
    M, K, N, r = 8, 32, 16, 4
    x = torch.randn(M, K, generator=g).half()
    W = (torch.randn(N, K, generator=g) / K ** 0.5).half()
    bias = torch.randn(N, generator=g).half()
    A = (torch.randn(r, K, generator=g) / K ** 0.5).requires_grad_(need_A)
    B = (torch.randn(N, r, generator=g) * 0.1).requires_grad_()
    m = (torch.rand(N, generator=g) + 0.5).requires_grad_()
    dy = torch.randn(M, N, generator=g).half()

    y = dora_linear(x, W, bias, A, B, m, scaling, backend="triton")
    got = torch.autograd.grad(y, [B, m] + ([A] if need_A else []), dy)

    leaves = [t.detach().double().requires_grad_() for t in (B, m, A)]
    B64, m64, A64 = leaves
    y64 = dora_linear_reference(x.double(), W.double(), bias.double(), A64, B64, m64, scaling)
    want = torch.autograd.grad(y64, [B64, m64] + ([A64] if need_A else []), dy.double())

    assert_close(y, y64, torch.float16, "y")
    for name, a, b in zip(("dB", "dm", "dA"), got, want):
        assert_close(a, b, torch.float16, f"{name} at scaling={scaling}")
