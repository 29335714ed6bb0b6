"""runtime.wide_columns: the launchers' WIDE flag turns on when ANY operand has a non-unit column stride and offsets
past 2**31 (column_dot passes a and b), not only when all do (mutation RT2: any → all survived: column_dot's a
narrow and b a transposed >2**31-element view would index b in int32, silently wrong at scale)."""
import torch

from fastft.kernels.runtime import wide_columns


def _meta(shape, stride):
    return torch.empty_strided(shape, stride, device="meta")


def test_one_wide_strided_operand_is_enough():
    narrow = _meta((4, 4), (4, 1))
    wide_transposed = _meta((2**16, 2**16), (1, 2**16))  # a .t() view: column stride 2**16, offsets past 2**31
    assert wide_columns(wide_transposed)
    assert wide_columns(narrow, wide_transposed)
    assert wide_columns(wide_transposed, narrow)
    assert not wide_columns(narrow, narrow)
    assert not wide_columns(_meta((2**16, 2**16), (2**16, 1)))  # unit column stride: the int32 cols never scale
