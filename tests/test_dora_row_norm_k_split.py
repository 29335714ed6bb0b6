"""DoRA's row norm split over K (several fp32 partials summed by torch): under the interpreter a split needs
K > 4·BLOCK_K = 128 and few row tiles (runtime.num_sms gives 4 there), which the other row-norm tests (K ≤ 128)
never reach; on a GPU every large-K layer takes this path."""
import pytest
import torch

from fastft.kernels.shared import split_rows
from fastft.kernels.runtime import num_sms
from fastft.ops.dora import dora_row_norm
from tests.utils import interpreter_only


@interpreter_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_row_norm_over_several_k_splits(dtype):
    g = torch.Generator().manual_seed(0)
    N, K, r, s = 40, 300, 6, 0.5
    assert split_rows(K, -(-N // 32), 1, num_sms(None), 32)[0] >= 2  # the case under test: more than one split
    A = torch.randn(r, K, generator=g).to(dtype)
    B = torch.randn(N, r, generator=g).to(dtype)
    W = torch.randn(N, K, generator=g).to(dtype)
    exact = torch.linalg.norm(W.double() + s * (B.double() @ A.double()), dim=1)
    got = dora_row_norm(W, A, B, s, dtype=dtype, backend="triton").double()
    assert torch.allclose(got, exact, rtol=1e-5, atol=0), (got - exact).abs().max()
