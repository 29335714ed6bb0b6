"""fp16 ia3_linear with a tiny vector (|l| ~ 1e-6): dl keeps fp16 accuracy. The fused kernels form dl as
Σ dy⊙y / l (output scale) or Σ x⊙dx / l (input scale) from fp16 values that are subnormal at such l (3% off at
1e-6), which is why fp16 runs the torch path; sending fp16 to the kernels passed every test."""
import pytest
import torch

from fastft.ops.ia3 import ia3_linear, ia3_linear_reference
from tests.utils import assert_close, interpreter_only


@interpreter_only
@pytest.mark.parametrize("feedforward", [False, True])
def test_fp16_ia3_dl_at_a_tiny_vector(feedforward):
    g = torch.Generator().manual_seed(0)
    M, K, N = 16, 32, 24
    x = torch.randn(M, K, generator=g).half()
    W = (torch.randn(N, K, generator=g) / K ** 0.5).half()
    b = torch.randn(N, generator=g).half()
    l = ((torch.rand(K if feedforward else N, generator=g) + 0.5) * 1e-6).requires_grad_()
    dy = torch.randn(M, N, generator=g).half()
    y = ia3_linear(x, W, b, l, feedforward=feedforward, backend="triton")
    (dl,) = torch.autograd.grad(y, [l], dy)
    l64 = l.detach().double().requires_grad_()
    y64 = ia3_linear_reference(x.double(), W.double(), b.double(), l64, feedforward)
    (want,) = torch.autograd.grad(y64, [l64], dy.double())
    assert_close(dl, want, torch.float16, f"dl (feedforward={feedforward})")
