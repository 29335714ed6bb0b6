"""ia3_linear's fused backward with a vector entry exactly 0 (a loaded adapter can hold one): dl is read back from the
saved y (or dx) divided by l, which for that entry is 0/0. safe_div makes it 0 (the documented limitation) and every
other gradient stays right; a plain division gave NaN in dl, which the optimizer spreads. Mutation run 18: nothing
tested a zero entry. Against the fp64 reference for everything but the zero entry's dl."""
import pytest
import torch

from fastft.ops.ia3 import ia3_linear, ia3_linear_reference
from tests.utils import assert_close, interpreter_only


@interpreter_only
@pytest.mark.parametrize("feedforward", [False, True])
def test_a_zero_entry_leaves_the_other_gradients_exact(feedforward):
    g = torch.Generator().manual_seed(0)
    M, K, N = 8, 16, 12
    x = torch.randn(M, K, generator=g, requires_grad=True)
    W, b = torch.randn(N, K, generator=g), torch.randn(N, generator=g)
    ia3_l = torch.rand(K if feedforward else N, generator=g) + 0.5
    ia3_l[2] = 0.0
    ia3_l.requires_grad_()
    dy = torch.randn(M, N, generator=g)
    dx, dl = torch.autograd.grad(ia3_linear(x, W, b, ia3_l, feedforward=feedforward, backend="triton"), [x, ia3_l],
                                 dy)
    x64, l64 = x.detach().double().requires_grad_(), ia3_l.detach().double().requires_grad_()
    dx64, dl64 = torch.autograd.grad(ia3_linear_reference(x64, W.double(), b.double(), l64, feedforward), [x64, l64],
                                     dy.double())
    assert torch.isfinite(dl).all()
    others = torch.arange(len(dl)) != 2
    assert_close(dx, dx64, torch.float32, "dx")
    assert_close(dl[others], dl64[others], torch.float32, "dl")
