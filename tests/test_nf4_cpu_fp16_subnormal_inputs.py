"""fp16 weights below 2^-14 are subnormal, and the C++ extension widens them by hand (csrc/nf4_cpu.cpp,
fp16_to_float: mantissa * 2^-24, with its sign). In an ordinary block they are far below its absmax and all land on
the zero code, so a wrong subnormal widening hides; here whole blocks (and a short tail block) hold only subnormal
values of both signs, so absmax and every code depend on it. Bytes and absmax must be the torch reference's."""
import pytest
import torch

from fastft.kernels import nf4_cpu
from fastft.quant import nf4_format as fmt

pytestmark = pytest.mark.skipif(not nf4_cpu.available(), reason="fastft._C not built")

BLOCK = 64
SMALLEST_NORMAL = 2.0 ** -14


def test_blocks_of_subnormal_fp16_values():
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(4 * BLOCK + 6, generator=g) * 2e-5).clamp(-0.9 * SMALLEST_NORMAL, 0.9 * SMALLEST_NORMAL)
    x = x.half()
    assert (x.float().abs() < SMALLEST_NORMAL).all() and (x < 0).any() and (x != 0).sum() > x.numel() // 2
    x[:4] = torch.tensor([2.0 ** -24, -(2.0 ** -24), 1023 * 2.0 ** -24, -(1023 * 2.0 ** -24)]).half()
    packed, absmax = nf4_cpu.quantize(x, BLOCK)
    packed_ref, absmax_ref = fmt.quantize_nf4_torch(x, BLOCK)
    assert torch.equal(absmax, absmax_ref)
    assert absmax[0].item() == 1023 * 2.0 ** -24            # the largest fp16 subnormal, widened exactly
    assert torch.equal(packed, packed_ref)
    assert packed[:2].tolist() == [0x77, 0xF0]             # ±1 ulp: the zero code twice; ±max: codes 15 and 0
