"""ia3_linear names an x/weight dtype mismatch (both backends) instead of failing inside F.linear or the kernels."""
import pytest
import torch

from fastft.ops.ia3 import ia3_linear
from tests.utils import interpreter_only


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=interpreter_only)])
@pytest.mark.parametrize("feedforward", [False, True])
def test_ia3_dtype_mismatch_is_a_named_value_error(backend, feedforward):
    x = torch.randn(4, 32)
    W = torch.randn(16, 32, dtype=torch.bfloat16)
    l = torch.rand(32 if feedforward else 16)
    with pytest.raises(ValueError, match="cast one of them"):
        ia3_linear(x, W, None, l, feedforward=feedforward, backend=backend)
