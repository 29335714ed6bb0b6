"""The short tail block of an NF4 tensor is scaled as bitsandbytes scales it: x / absmax (a division), where a full
block multiplies by the reciprocal (tests/test_nf4_full_blocks_scale_by_the_reciprocal.py). The two differ by an ulp,
which moves a code only next to a code midpoint, so random weights never show which one a quantizer uses. Here the
values whose quotient and product land on different codes sit in a tail block, at an even (high nibble) and an odd
(low nibble) position; the C++ extension must follow the quotient, as the torch reference and bitsandbytes do."""
import pytest
import torch

from fastft.kernels import nf4_cpu
from fastft.quant import nf4_format as fmt

BLOCK = 64


def _telling_cases():
    """[(absmax, x, code of x / absmax)] where x / absmax and x * (1 / absmax) round to different codes."""
    bounds = fmt._nf4_bounds("cpu")
    absmax = torch.linspace(1.0, 4.0, 4001)
    cases = []
    for mid in bounds:
        x = (mid.double() * absmax.double()).float()
        for _ in range(8):
            by_quotient = torch.bucketize(x / absmax, bounds)
            differ = (torch.bucketize(x * (1.0 / absmax), bounds) != by_quotient).nonzero().view(-1)
            if differ.numel():
                i = int(differ[0])
                cases.append((float(absmax[i]), float(x[i]), int(by_quotient[i])))
                break
            x = torch.nextafter(x, x * 2)
    return cases


def _with_tail(absmax: float, value: float) -> torch.Tensor:
    """A full block of noise, then a tail of 4: absmax, value (odd index), value (even index), 0."""
    head = torch.rand(BLOCK, generator=torch.Generator().manual_seed(0))
    return torch.cat([head, torch.tensor([absmax, value, value, 0.0])])


def _quantizers():
    yield "torch", fmt.quantize_nf4_torch
    if nf4_cpu.available():
        yield "cpp", nf4_cpu.quantize


@pytest.mark.parametrize("name,quantize", list(_quantizers()))
def test_the_tail_block_rounds_the_quotient(name, quantize):
    cases = _telling_cases()
    assert len(cases) >= 8
    for absmax, value, code in cases:
        packed, scales = quantize(_with_tail(absmax, value), BLOCK)
        assert scales[-1].item() == absmax
        tail = packed[BLOCK // 2:].tolist()
        assert [tail[0] & 0xF, tail[1] >> 4] == [code, code], (name, absmax, value)


def test_bitsandbytes_divides_in_the_tail_too():
    bnbf = pytest.importorskip("bitsandbytes.functional")
    absmax, value, _ = _telling_cases()[0]
    x = _with_tail(absmax, value)
    packed, _ = bnbf.quantize_4bit(x, blocksize=BLOCK, compress_statistics=False, quant_type="nf4")
    assert torch.equal(packed.view(-1), fmt.quantize_nf4_torch(x, BLOCK)[0])
