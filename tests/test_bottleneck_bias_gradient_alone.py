"""bottleneck_adapter's fused backward when a bias is the only thing that needs a gradient from its side: the down
bias with h, D and U frozen (dp must still be formed), the up bias with no down bias at all (db_u keyed on its own
bias). Mutation run 18: forming dp only for dh/dD, or keying db_u on the down bias, passed every test (the others
train the projections or pass both biases). Against the fp64 reference."""
import pytest
import torch

from fastft.ops.bottleneck_adapter import bottleneck_adapter, bottleneck_adapter_reference
from tests.utils import assert_close, interpreter_only


@interpreter_only
@pytest.mark.parametrize("trained, with_down_bias", [("bd", True), ("bu", False)])
def test_one_bias_trained_against_fp64(trained, with_down_bias):
    M, N, r = 16, 24, 4
    g = torch.Generator().manual_seed(0)
    h = torch.randn(M, N, generator=g)
    D = torch.randn(r, N, generator=g) * N ** -0.5
    bd = torch.randn(r, generator=g) * 0.1 if with_down_bias else None
    U = torch.randn(N, r, generator=g) * 0.1
    bu = torch.randn(N, generator=g) * 0.1
    dy = torch.randn(M, N, generator=g)
    names = ("h", "D", "bd", "U", "bu")
    args = [None if t is None else t.clone().requires_grad_(n == trained) for n, t in zip(names, (h, D, bd, U, bu))]
    (got,) = torch.autograd.grad(bottleneck_adapter(*args, "silu", backend="triton"), [args[names.index(trained)]],
                                 dy)
    args64 = [None if t is None else t.detach().double().requires_grad_(n == trained) for n, t in zip(names, args)]
    (want,) = torch.autograd.grad(bottleneck_adapter_reference(*args64, "silu"), [args64[names.index(trained)]],
                                  dy.double())
    assert_close(got, want, torch.float32, f"d{trained}")


@interpreter_only
def test_no_tokens_on_the_triton_backend():
    D, U = torch.randn(4, 24), torch.randn(24, 4)
    h = torch.randn(0, 24, requires_grad=True)
    y = bottleneck_adapter(h, D.requires_grad_(), None, U, None, "relu", backend="triton")
    (dD,) = torch.autograd.grad(y.sum(), [D])
    assert y.shape == (0, 24) and torch.equal(dD, torch.zeros_like(D))
