"""fp16 bottleneck adapter backward at a small dy·U (U starts near 0 and grows by ~lr a step; loss scaling can
leave dy ~ 1e-4): dz = dy·U was stored in fp16 (~1e-7: subnormal, 2^-24 steps), so the down projection's gradients
dD and db_d, made from dz alone, lost 7e-3 to 2.6e-2 against fp64 (the plain fp16 / autocast reference loses as
much; an fp32 rank path keeps 3e-7). dz now stays fp32 and dD's operand is scaled per rank column by a power of two
(undone in its fp32 sum), which keeps them at fp16 rounding."""
import pytest
import torch

from fastft.ops.bottleneck_adapter import bottleneck_adapter, bottleneck_adapter_reference
from tests.utils import interpreter_only


def _rel(a, b):
    assert torch.isfinite(a).all()
    return ((a.double() - b).norm() / b.norm()).item()


@interpreter_only
@pytest.mark.parametrize("activation", ["relu", "silu", "gelu_tanh", "tanh"])
@pytest.mark.parametrize("u_scale", [1e-3, 1e-5])
def test_fp16_bottleneck_down_gradients_at_small_dz(activation, u_scale):
    M, N, r = 200, 130, 16
    g = torch.Generator().manual_seed(0)
    h = torch.randn(M, N, generator=g).half()
    D = torch.randn(r, N, generator=g) * N ** -0.5  # fp32 masters
    bd = torch.randn(r, generator=g) * 0.1
    U = torch.randn(N, r, generator=g) * u_scale
    bu = torch.zeros(N)
    dy = (torch.randn(M, N, generator=g) * 1e-4).half()
    leaves = [t.clone().requires_grad_() for t in (h, D, bd, U, bu)]
    got = torch.autograd.grad(bottleneck_adapter(*leaves, activation, backend="triton"), leaves, dy)
    leaves64 = [t.double().requires_grad_() for t in (h, D, bd, U, bu)]
    want = torch.autograd.grad(bottleneck_adapter_reference(*leaves64, activation), leaves64, dy.double())
    errs = {n: _rel(a, b) for n, a, b in zip(("dh", "dD", "dbd", "dU", "dbu"), got, want)}
    # fp16 rounding of h, dy and the rank intermediates: ~3e-4 (before: 1.5e-2 to 2.9e-2 at |U| ~ 1e-3, ~1 at 1e-5);
    # at |U| ~ 1e-5 U itself is an fp16 subnormal (in the forward too): ~1.8e-3
    bound = 1e-3 if u_scale >= 1e-4 else 3e-3
    assert errs["dD"] < bound and errs["dbd"] < bound, errs
    assert errs["dh"] < 1e-3 and errs["dU"] < 1e-3 and errs["dbu"] < 1e-3, errs


def test_column_scales_stay_finite_and_exact():
    """Powers of two (exact products), the column max brought into [2^13, 2^14), 1 for zero or non-finite columns,
    finite for fp32 subnormals, and no rows at all (a compiled graph called with 0 tokens)."""
    from fastft.ops.bottleneck_adapter import column_scaled, unscaled_rows

    dp = torch.tensor([[1e-7, 0.0, float("inf"), 1e-40, -3e4], [3e-8, 0.0, 1.0, 0.0, 7.0]])
    scaled, c = column_scaled(dp)
    assert torch.isfinite(c).all() and torch.equal(torch.frexp(c).mantissa, torch.full_like(c, 0.5))
    assert c[1] == 1 and c[2] == 1  # an all-zero column, a column holding inf
    for j in (0, 4):
        assert 2**13 <= scaled[:, j].float().abs().max() < 2**14
    assert torch.equal(unscaled_rows(scaled.float().t(), c), (scaled.float() / c).t())
    empty, c0 = column_scaled(torch.zeros(0, 16))
    assert empty.shape == (0, 16) and torch.equal(c0, torch.ones(16))


def test_power_of_two_scales_both_modes():
    """The helper the adapter's dD operand and the LoRA head's dA operand share (fastft.ops.shared): top·c lands in
    [2^(e-1), 2^e), 1 for 0 / inf / NaN, finite for fp32 subnormals (the head's own copy gave inf there), and with
    at_least_one only scales up."""
    from fastft.ops.shared import power_of_two_scales

    top = torch.tensor([3e-6, 5.0, 0.0, float("inf"), float("nan"), 1e-40, 0.75])
    c = power_of_two_scales(top, 0, at_least_one=True)
    assert torch.isfinite(c).all() and torch.equal(torch.frexp(c).mantissa, torch.full_like(c, 0.5))
    assert 0.5 <= top[0] * c[0] < 1 and c[1] == 1 and c[2] == c[3] == c[4] == 1 and c[6] == 1
    c14 = power_of_two_scales(top, 14)
    assert 2**13 <= top[0] * c14[0] < 2**14 and 2**13 <= top[1] * c14[1] < 2**14 and c14[5] == 2.0**126
