"""rms_norm with a residual normalises h = x + residual rounded to x's dtype (what transformers' decoder layer
feeds its norm and what is returned as h), not the unrounded fp32 sum: y equals rms_norm of that h, bitwise."""
import pytest
import torch

from fastft.ops import rms_norm
from tests.utils import interpreter_only


@interpreter_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_rms_norm_with_residual_equals_norm_of_the_rounded_sum(dtype, offset):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(9, 100, generator=gen).to(dtype)
    res = (torch.randn(9, 100, generator=gen) * 3).to(dtype)
    w = (torch.randn(100, generator=gen) * 0.3 + 1 - offset).to(dtype)
    y, h = rms_norm(x, w, 1e-6, offset=offset, residual=res, backend="triton")
    assert torch.equal(h, res + x)
    y_ref = rms_norm(res + x, w, 1e-6, offset=offset, backend="triton")
    assert torch.equal(y, y_ref)
