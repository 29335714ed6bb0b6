"""The C++ extension rounds each dequantized fp32 value to fp16 / bf16 by hand (csrc/nf4_cpu.cpp, float_to_fp16 and
float_to_bf16): nearest, ties to even, subnormals and the overflow to inf included, as torch's `.to(dtype)` does.
Random weights almost never give a product code * absmax exactly halfway between two fp16 or bf16 values, so the other
tests cannot tell ties-to-even from ties-away. Here absmax values are chosen so that code 15 (1.0) and code 0 (-1.0)
times absmax fall on such halfway points, in the normal and the subnormal fp16 range, for bf16, just below and above
the smallest fp16 subnormal and around fp16's largest finite value; the outputs must be the torch reference's."""
import pytest
import torch

from fastft.kernels import nf4_cpu
from fastft.quant import nf4_format as fmt

BLOCK = 64
SUB = 2.0 ** -24                                             # the smallest fp16 subnormal

FP16_TIES = [1 + 2 ** -11, 1 + 3 * 2 ** -11, 1000 + 0.25, 2 ** -14 * (1 + 2 ** -11),  # normal: halfway
             0.5 * SUB, 1.5 * SUB, 2.5 * SUB, 3.5 * SUB, 1022.5 * SUB, 1023.5 * SUB,  # subnormal: halfway
             0.75 * SUB, 0.5 * SUB * (1 + 2 ** -20), 0.5 * SUB * (1 - 2 ** -20),         # around half the smallest
             65504.0, 65519.0, 65520.0, 65535.0, 65536.0, 1e5]                            # fp16's top and past it
BF16_TIES = [1 + 2 ** -8, 1 + 3 * 2 ** -8, 2 ** -126 * (1 + 2 ** -8), 3 * 2 ** 100 * (1 + 2 ** -8)]


def _blocks_of(absmax_values):
    """Blocks of alternating codes 15 and 0: +absmax and -absmax, each rounded once to the output dtype."""
    absmax = torch.tensor(absmax_values, dtype=torch.float32)
    packed = torch.full((absmax.numel() * BLOCK // 2,), 0xF0, dtype=torch.uint8)
    return packed, absmax, absmax.numel() * BLOCK


@pytest.mark.skipif(not nf4_cpu.available(), reason="fastft._C not built")
@pytest.mark.parametrize("dtype,values", [(torch.float16, FP16_TIES), (torch.bfloat16, BF16_TIES)])
def test_halfway_products_round_like_torch(dtype, values):
    packed, absmax, numel = _blocks_of(values)
    want = fmt.dequantize_nf4_torch(packed, absmax, numel, BLOCK, dtype)
    got = nf4_cpu.dequantize(packed, absmax, numel, BLOCK, dtype)
    wrong = [(v, g, w) for v, g, w in zip(values, got[::BLOCK].tolist(), want[::BLOCK].tolist()) if g != w]
    assert torch.equal(got, want), wrong                    # (absmax, C++ value, torch value) of +absmax


def test_the_torch_reference_rounds_these_ties_to_even():
    """What the cases above pin: a few of torch's own results, so a reference change is noticed too."""
    half = torch.tensor([1 + 2 ** -11, 1 + 3 * 2 ** -11, 2.5 * SUB, 1.5 * SUB, 0.5 * SUB, 0.75 * SUB, 65520.0])
    assert half.half().float().tolist() == [1.0, 1 + 2 ** -9, 2 * SUB, 2 * SUB, 0.0, SUB, float("inf")]
    assert torch.tensor([1 + 2 ** -8, 1 + 3 * 2 ** -8]).bfloat16().float().tolist() == [1.0, 1 + 2 ** -6]
