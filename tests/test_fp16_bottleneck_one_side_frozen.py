"""fp16 bottleneck adapter backward with only one of the projections trainable: _backward then takes its
single-gradient paths (rank_reduce for dD alone when the up projection U is frozen, for dU alone when D is frozen)
instead of rank_reduce_pair. In fp16, dD's operand is dp·diag(c) (column_scaled's powers of two), which dD alone
must divide out as the pair path does (unscaled_rows): the other tests always train both."""
import pytest
import torch

from fastft.ops.bottleneck_adapter import bottleneck_adapter, bottleneck_adapter_reference
from tests.utils import interpreter_only


@interpreter_only
@pytest.mark.parametrize("frozen", ["U", "D"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_bottleneck_gradients_with_one_projection_frozen(frozen, dtype):
    M, N, r = 64, 48, 8
    g = torch.Generator().manual_seed(0)
    h = torch.randn(M, N, generator=g).to(dtype)
    D = torch.randn(r, N, generator=g) * N ** -0.5  # fp32 masters
    bd = torch.randn(r, generator=g) * 0.1
    U = torch.randn(N, r, generator=g) * 1e-2
    bu = torch.zeros(N)
    dy = (torch.randn(M, N, generator=g) * 1e-2).to(dtype)
    names = ("h", "D", "bd", "U", "bu")
    leaves = [t.clone().requires_grad_(n != frozen) for n, t in zip(names, (h, D, bd, U, bu))]
    trainable = [i for i, n in enumerate(names) if n != frozen]
    got = torch.autograd.grad(bottleneck_adapter(*leaves, "silu", backend="triton"), [leaves[i] for i in trainable],
                              dy)
    leaves64 = [t.detach().double().requires_grad_(n != frozen) for n, t in zip(names, leaves)]
    want = torch.autograd.grad(bottleneck_adapter_reference(*leaves64, "silu"), [leaves64[i] for i in trainable],
                               dy.double())
    for i, a, b in zip(trainable, got, want):
        assert torch.isfinite(a).all(), names[i]
        err = ((a.double() - b).norm() / b.norm()).item()
        assert err < (2e-3 if dtype == torch.float16 else 1e-5), f"d{names[i]}: rel err {err:.2e} (frozen {frozen})"
