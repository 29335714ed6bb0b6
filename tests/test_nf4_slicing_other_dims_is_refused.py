"""An NF4Weight slices and splits along rows only: a column slice or split along dim 1 raises
NotImplementedError instead of being taken as rows (which would return other values under a plausible shape)."""
import pytest
import torch

from fastft.quant import quantize_nf4


def test_column_slice_and_split_are_refused():
    w = quantize_nf4(torch.randn(32, 64), blocksize=64, double_quant=False)
    with pytest.raises(NotImplementedError, match="only along dim 0"):
        w[:, :16]
    with pytest.raises(NotImplementedError, match="only along dim 0"):
        torch.split(w, 32, dim=1)
    with pytest.raises(NotImplementedError, match="only along dim 0"):
        torch.split(w, [16, 48], dim=1)
