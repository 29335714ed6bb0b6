"""dora_linear's fused backward in fp16 with B frozen: dA's own branch (not the one-launch pair) must carry
split_scaling's factor b (s = -2 -> a = -1, b = 2; s = 4 -> a = 1, b = 4). Mutation run 18: dropping b there passed
every test (tests/test_dora_fp16_split_scaling_grads.py trains B in every case)."""
import pytest
import torch

from fastft.ops.dora import dora_linear, dora_linear_reference
from tests.utils import assert_close, interpreter_only


@interpreter_only
@pytest.mark.parametrize("scaling", [-2.0, 4.0])
def test_fp16_dA_with_B_frozen_against_fp64(scaling):
    g = torch.Generator().manual_seed(0)
    M, K, N, r = 8, 32, 16, 4
    x = torch.randn(M, K, generator=g).half()
    W = (torch.randn(N, K, generator=g) / K ** 0.5).half()
    A = (torch.randn(r, K, generator=g) / K ** 0.5).requires_grad_()
    B = torch.randn(N, r, generator=g) * 0.1
    m = torch.rand(N, generator=g) + 0.5
    dy = torch.randn(M, N, generator=g).half()

    (dA,) = torch.autograd.grad(dora_linear(x, W, None, A, B, m, scaling, backend="triton"), [A], dy)

    A64 = A.detach().double().requires_grad_()
    y64 = dora_linear_reference(x.double(), W.double(), None, A64, B.double(), m.double(), scaling)
    (want,) = torch.autograd.grad(y64, [A64], dy.double())
    assert_close(dA, want, torch.float16, f"dA at scaling={scaling}")
