"""cos/sin whose last dimension is not q's head_dim are refused (the torch path would broadcast a (B, S, 1) table
silently, and the kernel would read a half-width table with q's head_dim: wrong rotations either way)."""
import pytest
import torch

from fastft.ops import rope, rope_


@pytest.mark.parametrize("width", [1, 8])
@pytest.mark.parametrize("fn", [rope, rope_])
def test_table_of_another_head_dim_is_refused(fn, width):
    q, k = torch.randn(1, 2, 4, 16), torch.randn(1, 1, 4, 16)
    cos, sin = torch.randn(1, 4, width), torch.randn(1, 4, width)
    with pytest.raises(ValueError, match=r"`cos` must have shape \(1 or 1, 4, 16\)"):
        fn(q, k, cos, sin, backend="torch")
