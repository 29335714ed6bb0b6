"""Rows of an NF4Weight whose first element falls inside a quantization block are refused, also when the slice
runs to the end of the weight (its last block may be partial): the piece would decode with shifted block scales."""
import pytest
import torch

from fastft.quant import quantize_nf4


@pytest.mark.parametrize("double_quant", [False, True])
def test_slice_starting_inside_a_block_to_the_end_is_refused(double_quant):
    w = quantize_nf4(torch.randn(4, 32), blocksize=64, double_quant=double_quant)
    with pytest.raises(ValueError, match="cut through a quantization block"):
        w[1:4]
    part = w[2:4]  # starts on a block: fine, and decodes as the same rows of the whole
    assert torch.equal(part.dequantize(), w.dequantize()[2:4])
