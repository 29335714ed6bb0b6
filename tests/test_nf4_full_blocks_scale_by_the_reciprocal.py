"""A full NF4 block is scaled as bitsandbytes scales it: x * (1 / absmax), the reciprocal rounded to fp32 first, not
x / absmax (the short tail block divides). The two differ by an ulp, which moves a code only for a value next to a
code midpoint, so random weights never show it. The test searches such values (for every midpoint, an absmax and an
x where the product and the quotient fall on different sides of it) and checks the codes follow the product, on
the torch reference, the C++ extension and, where installed, bitsandbytes itself."""
import pytest
import torch

from fastft.kernels import nf4_cpu
from fastft.quant import nf4_format as fmt

BLOCK = 64


def _telling_cases():
    """[(absmax, x, code by x * (1/absmax))], one per midpoint where the search finds one: x near midpoint * absmax,
    absmax in [1, 4], whose product and quotient round to different codes."""
    bounds = fmt._nf4_bounds("cpu")
    absmax = torch.linspace(1.0, 4.0, 4001)
    cases = []
    for mid in bounds:
        x = (mid.double() * absmax.double()).float()
        for step in range(8):      # x, then its next fp32 neighbours away from zero
            by_product = torch.bucketize(x * (1.0 / absmax), bounds)
            by_quotient = torch.bucketize(x / absmax, bounds)
            differ = (by_product != by_quotient).nonzero().view(-1)
            if differ.numel():
                i = int(differ[0])
                cases.append((float(absmax[i]), float(x[i]), int(by_product[i]), int(by_quotient[i])))
                break
            x = torch.nextafter(x, x * 2)
    return cases


def _blocks(cases) -> torch.Tensor:
    """One block per case: absmax at index 0, x at index 1, zeros after."""
    x = torch.zeros(len(cases), BLOCK)
    for row, (absmax, value, _, _) in enumerate(cases):
        x[row, 0], x[row, 1] = absmax, value
    return x


def _second_codes(packed: torch.Tensor) -> list[int]:
    return (packed.view(-1, BLOCK // 2)[:, 0] & 0xF).tolist()   # element 1: the low nibble of each block's byte 0


def _quantizers():
    yield "torch", fmt.quantize_nf4_torch
    if nf4_cpu.available():
        yield "cpp", nf4_cpu.quantize


def test_the_search_finds_telling_values():
    assert len(_telling_cases()) >= 8     # most midpoints have one in the searched range


@pytest.mark.parametrize("name,quantize", list(_quantizers()))
def test_full_blocks_round_the_product_with_the_reciprocal(name, quantize):
    cases = _telling_cases()
    packed, absmax = quantize(_blocks(cases), BLOCK)
    assert absmax.tolist() == [c[0] for c in cases]
    assert _second_codes(packed) == [c[2] for c in cases], name


def test_bitsandbytes_rounds_the_product_too():
    bnbf = pytest.importorskip("bitsandbytes.functional")
    cases = _telling_cases()
    packed, _ = bnbf.quantize_4bit(_blocks(cases), blocksize=BLOCK, compress_statistics=False, quant_type="nf4")
    assert _second_codes(packed.view(-1)) == [c[2] for c in cases]
