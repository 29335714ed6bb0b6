"""dora_linear refuses a magnitude or bias of the wrong length and an x whose dtype is not the weight's with a
ValueError naming the argument. Without these checks torch fails later with a broadcasting or dtype RuntimeError
that names none of them (mutation run 18: each check could be dropped with no test failing)."""
import pytest
import torch

from fastft.ops.dora import dora_linear


def _args(N=10, K=12, r=3):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, K, generator=g)
    W = torch.randn(N, K, generator=g)
    b = torch.randn(N, generator=g)
    A = torch.randn(r, K, generator=g)
    B = torch.randn(N, r, generator=g)
    m = torch.rand(N, generator=g) + 0.5
    return [x, W, b, A, B, m]


@pytest.mark.parametrize("index, name", [(5, "magnitude"), (2, "bias")])
def test_a_vector_one_entry_too_long_is_named(index, name):
    args = _args()
    args[index] = torch.cat([args[index], args[index][:1]])
    with pytest.raises(ValueError, match=f"`{name}` must .*shape \\(10,\\)"):
        dora_linear(*args, 0.5, backend="torch")


def test_x_in_another_dtype_than_the_weight_is_named():
    args = _args()
    args[0] = args[0].double()
    with pytest.raises(ValueError, match="`x` is torch.float64 but `weight` is torch.float32"):
        dora_linear(*args, 0.5, backend="torch")
