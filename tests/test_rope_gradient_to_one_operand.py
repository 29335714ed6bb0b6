"""Gradients through the Triton rope when only one operand asks for one: a sin table that needs a gradient (cos not)
goes to the reference, and rope_ with only k needing a gradient records the rotation for k."""
import torch

from fastft.ops import rope, rope_, rope_cos_sin, rope_reference
from tests.utils import interpreter_only

pytestmark = interpreter_only


def _tables(S=5, D=16):
    inv_freq = 1.0 / (10000 ** (torch.arange(0, D, 2).float() / D))
    return rope_cos_sin(torch.arange(S)[None], inv_freq)


def test_sin_alone_needing_a_gradient_gets_it():
    torch.manual_seed(0)
    q, k = torch.randn(1, 2, 5, 16), torch.randn(1, 1, 5, 16)
    cos, sin = _tables()
    sin_a, sin_b = sin.clone().requires_grad_(), sin.clone().requires_grad_()
    wq, wk = torch.randn_like(q), torch.randn_like(k)
    gq, gk = rope(q, k, cos, sin_a, backend="triton")
    ((gq * wq).sum() + (gk * wk).sum()).backward()
    rq, rk = rope_reference(q, k, cos, sin_b)
    ((rq * wq).sum() + (rk * wk).sum()).backward()
    assert sin_a.grad is not None
    torch.testing.assert_close(sin_a.grad, sin_b.grad, rtol=1e-5, atol=1e-5)


def test_rope_inplace_with_only_k_needing_a_gradient():
    torch.manual_seed(0)
    q, k0 = torch.randn(1, 2, 5, 16), torch.randn(1, 1, 5, 16, requires_grad=True)
    cos, sin = _tables()
    wk = torch.randn_like(k0)
    k = k0 * 1.0  # a non-leaf: rope_ may write into it
    _, k_out = rope_(q.clone(), k, cos, sin, backend="triton")
    (k_out * wk).sum().backward()
    k1 = k0.detach().clone().requires_grad_()
    _, rk = rope_reference(q, k1, cos, sin)
    (rk * wk).sum().backward()
    torch.testing.assert_close(k0.grad, k1.grad, rtol=1e-5, atol=1e-5)
