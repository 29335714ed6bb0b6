"""fastft.kernels.nf4_cpu hands raw pointers to C++ loops that trust every size, so its Python checks are all that
stands between a short buffer and an out-of-bounds read. Pinned at the edges a plain `numel // 2` or
`numel // blocksize` gets wrong: an odd numel needs its half-filled last byte, a short tail block its own absmax.
And `absmax` is read as fp32 whatever dtype it arrives in (converted first, not reinterpreted)."""
import pytest
import torch

from fastft.kernels import nf4_cpu
from fastft.quant import nf4_format as fmt

pytestmark = pytest.mark.skipif(not nf4_cpu.available(), reason="fastft._C not built")

BLOCK = 64


def test_an_odd_numel_needs_its_last_half_filled_byte():
    numel = 2 * BLOCK + 1                                   # 129 values: 65 bytes, the last one half used
    absmax = torch.ones(fmt.num_blocks(numel, BLOCK))
    short = torch.zeros(numel // 2, dtype=torch.uint8)      # 64 bytes: the 129th code is past the buffer
    with pytest.raises(ValueError, match=f"{numel} values in blocks of {BLOCK} need {(numel + 1) // 2} packed bytes"):
        nf4_cpu.dequantize(short, absmax, numel, BLOCK, torch.float32)
    enough = torch.zeros((numel + 1) // 2, dtype=torch.uint8)
    assert nf4_cpu.dequantize(enough, absmax, numel, BLOCK, torch.float32).shape == (numel,)


def test_a_short_tail_block_needs_its_own_absmax():
    numel = 2 * BLOCK + 2                                   # two full blocks and a tail of 2: three absmax values
    packed = torch.zeros((numel + 1) // 2, dtype=torch.uint8)
    short = torch.ones(numel // BLOCK)
    with pytest.raises(ValueError, match=f"need {numel // 2} packed bytes and {fmt.num_blocks(numel, BLOCK)} absmax"):
        nf4_cpu.dequantize(packed, short, numel, BLOCK, torch.float32)
    out = nf4_cpu.dequantize(packed, torch.ones(fmt.num_blocks(numel, BLOCK)), numel, BLOCK, torch.float32)
    assert out.shape == (numel,)


@pytest.mark.parametrize("absmax_dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_absmax_of_another_dtype_is_converted_not_reinterpreted(absmax_dtype):
    x = torch.randn(4 * BLOCK + 10, generator=torch.Generator().manual_seed(3))
    packed, absmax = nf4_cpu.quantize(x, BLOCK)
    other = absmax.to(absmax_dtype)                          # the values it holds, read back as fp32
    want = nf4_cpu.dequantize(packed, other.float(), x.numel(), BLOCK, torch.float32)
    got = nf4_cpu.dequantize(packed, other, x.numel(), BLOCK, torch.float32)
    assert torch.equal(got, want)
    assert torch.equal(got, fmt.dequantize_nf4_torch(packed, other.float(), x.numel(), BLOCK, torch.float32))
