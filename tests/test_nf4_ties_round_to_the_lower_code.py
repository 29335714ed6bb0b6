"""NF4 rounds a scaled value that lies exactly on the midpoint of two code values to the LOWER code (bitsandbytes'
rule, documented in fastft.quant.nf4_format): random weights almost never land on a midpoint, so the other tests
cannot tell ties-to-lower from ties-to-upper. Here a block whose absmax is 1 (scaling is exact) holds every midpoint,
computed in fp32 as the format computes them; the torch reference and the C++ extension must both pick the lower
code, and a value one ulp above a midpoint the upper one."""
import pytest
import torch

from fastft.kernels import nf4_cpu
from fastft.quant import nf4_format as fmt

BLOCK = 64


def _codes(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """The 4-bit codes in flat order (even index in the high nibble)."""
    return torch.stack([packed >> 4, packed & 0xF], dim=1).view(-1)[:numel].long()


def _midpoint_block(above: bool) -> torch.Tensor:
    code = torch.tensor(fmt.NF4_CODE_VALUES, dtype=torch.float32)
    mids = (code[:-1] + code[1:]) / 2                       # fp32, as the format computes its bounds
    if above:
        mids = torch.nextafter(mids, torch.tensor(2.0))
    x = torch.zeros(BLOCK)
    x[0] = 1.0                                              # absmax 1: x / absmax is x itself
    x[1:1 + mids.numel()] = mids
    return x


def _quantizers():
    yield "torch", fmt.quantize_nf4_torch
    if nf4_cpu.available():
        yield "cpp", nf4_cpu.quantize


@pytest.mark.parametrize("name,quantize", list(_quantizers()))
def test_midpoints_round_to_the_lower_code(name, quantize):
    n_mids = len(fmt.NF4_CODE_VALUES) - 1
    packed, absmax = quantize(_midpoint_block(above=False), BLOCK)
    assert absmax.tolist() == [1.0]
    codes = _codes(packed, BLOCK)
    assert codes[0] == len(fmt.NF4_CODE_VALUES) - 1       # 1.0: the top code
    assert codes[1:1 + n_mids].tolist() == list(range(n_mids)), name   # midpoint i: code i, not i + 1
    packed, _ = quantize(_midpoint_block(above=True), BLOCK)
    assert _codes(packed, BLOCK)[1:1 + n_mids].tolist() == list(range(1, n_mids + 1)), name


def test_bitsandbytes_rounds_midpoints_to_the_lower_code_too():
    bnbf = pytest.importorskip("bitsandbytes.functional")
    x = _midpoint_block(above=False)
    packed, _ = bnbf.quantize_4bit(x, blocksize=BLOCK, compress_statistics=False, quant_type="nf4")
    assert torch.equal(packed.view(-1), fmt.quantize_nf4_torch(x, BLOCK)[0])
