"""An all-zero short tail block, stored as bitsandbytes stores it: its absmax is the 1e-38 floor (bitsandbytes keeps
the clamped value for the tail block, unlike a full block's plain 0), and its values are the zero code 7 (0/0
would be NaN and land on another code: the same dequantized zeros, other bytes than bitsandbytes writes). Random
weights never make an all-zero block, so the format's other tests do not see this."""
import pytest
import torch

from fastft.kernels import nf4_cpu
from fastft.quant import nf4_format as fmt

BLOCK = 64


def _quantizers():
    yield "torch", fmt.quantize_nf4_torch
    if nf4_cpu.available():
        yield "cpp", nf4_cpu.quantize


@pytest.mark.parametrize("name,quantize", list(_quantizers()))
@pytest.mark.parametrize("tail", [2, 7])
def test_an_all_zero_tail_block_keeps_the_floor_and_the_zero_code(name, quantize, tail):
    x = torch.cat([torch.randn(BLOCK, generator=torch.Generator().manual_seed(0)), torch.zeros(tail)])
    packed, absmax = quantize(x, BLOCK)
    floor = torch.tensor(fmt._TINY, dtype=torch.float32)    # 1e-38 as fp32 holds it
    assert absmax[-1] == floor, name
    zero = fmt.NF4_ZERO_CODE
    assert packed[BLOCK // 2:].tolist() == [(zero << 4) | zero] * ((tail + 1) // 2), name
    # a full all-zero block keeps a plain 0 (bitsandbytes clamps only for its reciprocal there)
    packed_full, absmax_full = quantize(torch.zeros(BLOCK), BLOCK)
    assert absmax_full.tolist() == [0.0] and packed_full.tolist() == [(zero << 4) | zero] * (BLOCK // 2)
    assert torch.equal(fmt.dequantize_nf4_torch(packed, absmax, x.numel(), BLOCK, torch.float32)[BLOCK:],
                       torch.zeros(tail))


def test_bitsandbytes_stores_the_same_tail():
    bnbf = pytest.importorskip("bitsandbytes.functional")
    x = torch.cat([torch.randn(BLOCK, generator=torch.Generator().manual_seed(0)), torch.zeros(3)])
    packed, state = bnbf.quantize_4bit(x, blocksize=BLOCK, compress_statistics=False, quant_type="nf4")
    ours, absmax = fmt.quantize_nf4_torch(x, BLOCK)
    assert torch.equal(packed.view(-1), ours) and torch.equal(state.absmax, absmax)
