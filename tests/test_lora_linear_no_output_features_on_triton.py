"""lora_linear(backend="triton") on a layer with no output features (weight (0, K)): an empty y and zero gradients,
without launching the kernels. Mutation run 18: sending N = 0 to the kernels was not covered by any test."""
import torch

from fastft.ops.lora import lora_linear
from tests.utils import interpreter_only


@interpreter_only
def test_zero_output_features():
    K, r = 16, 2
    x = torch.randn(3, K, requires_grad=True)
    A = torch.randn(r, K, requires_grad=True)
    y = lora_linear(x, torch.randn(0, K), None, A, torch.randn(0, r), 2.0, backend="triton")
    dx, dA = torch.autograd.grad(y.sum(), [x, A], allow_unused=True)
    assert y.shape == (3, 0)
    assert all(g is None or torch.equal(g, torch.zeros_like(g)) for g in (dx, dA))
