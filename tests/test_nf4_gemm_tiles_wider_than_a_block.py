"""NF4 kernels where one tile spans several quantization blocks, and weights with more than 256 blocks.

The interpreter's default GEMM config (BLOCK_K = BLOCK_N = 32) never takes `_nf4_w_tile`'s per-group scale
branch (tile columns > blocksize, the GPU configs' BLOCK_K = 64 over blocksize 32), and the existing bit-exact
dequant tests stay under 256 blocks, so every block read the same nested absmax2 entry. These force both.
"""
import pytest
import torch

from fastft.quant import nf4_format as fmt
from fastft.quant import quantize_nf4
from tests.utils import assert_close, interpreter_only

pytestmark = interpreter_only


def _reference_weight(w, dtype=torch.float32):
    """W from the pure-torch decode (nested absmax decoded by torch too), not the Triton kernel."""
    return fmt.dequantize_nf4_torch(w.packed, w.block_absmax(), w.numel(), w.blocksize, dtype).view(w.shape)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
@pytest.mark.parametrize("decode", [0, 1])
@pytest.mark.parametrize("contiguous", [True, False], ids=["descriptors", "pointers"])
def test_gemm_tile_spanning_several_blocks_with_many_nested_groups(dtype, decode, contiguous):
    from fastft.kernels.nf4_gemm import nf4_lora_gemm

    # K = 160: 5 blocks of 32 per row, the last 64-wide k tile half past the row end; 100 x 160 / 32 = 500
    # blocks, so the nested absmax2 has two entries. N = 100 makes the dx tiles (64 columns of W) ragged too.
    M, N, K = 37, 100, 160
    w = quantize_nf4(torch.randn(N, K) * 0.1, blocksize=32, double_quant=True)
    assert w.absmax2.numel() == 2
    W = _reference_weight(w).double()
    config = dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=64, GROUP_M=2, DECODE=decode, num_warps=4, num_stages=1)
    x = torch.randn(M, K, dtype=dtype) if contiguous else torch.randn(K, M, dtype=dtype).t()
    bias = torch.randn(N, dtype=dtype)
    y = nf4_lora_gemm(x, w.kernel_operand(), None, None, bias, w_nk=True, config=config)
    assert_close(y, x.double() @ W.T + bias.double(), dtype, "x·Wᵀ + b")
    dy = torch.randn(M, N, dtype=dtype) if contiguous else torch.randn(N, M, dtype=dtype).t()
    dx = nf4_lora_gemm(dy, w.kernel_operand(), None, None, None, w_nk=False, config=config)
    assert_close(dx, dy.double() @ W, dtype, "dy·W")


@pytest.mark.parametrize("dtype", (torch.float32, torch.float16, torch.bfloat16))
def test_dequant_bit_exact_past_the_first_nested_group(dtype):
    from fastft.kernels.nf4_dequant import DECODE_GATHER, DECODE_SELECT, nf4_dequantize

    # 300 blocks of 32 and a ragged tail: blocks 256.. read absmax2[1]
    numel = 32 * 300 + 17
    w = quantize_nf4(torch.randn(numel) * 2, blocksize=32, double_quant=True)
    assert w.absmax2.numel() == 2 and not torch.equal(w.absmax2[0], w.absmax2[1])
    ref = fmt.dequantize_nf4_torch(w.packed, w.block_absmax(), numel, 32, dtype)
    for config in (dict(BLOCK=256, DECODE=DECODE_GATHER, num_warps=4),
                   dict(BLOCK=1024, DECODE=DECODE_SELECT, num_warps=4, ROW4=True)):
        out = nf4_dequantize(w.packed, w.absmax, numel, 32, dtype, w.code, absmax2=w.absmax2, code2=w.code2,
                             offset=w.offset, nested_blocksize=w.nested_blocksize, config=config)
        assert torch.equal(out, ref), config


def test_dequant_bf16_ties_round_to_even():
    """code 1.0 times an absmax exactly halfway between two bf16 values: round to nearest even, as torch's
    fp32 → bf16 cast and the GPU's cvt.rn do (the interpreter's rounding by hand must match them)."""
    from fastft.kernels.nf4_codes import NF4_CODE_VALUES
    from fastft.kernels.nf4_dequant import DECODE_GATHER, DECODE_SELECT, nf4_dequantize

    blocks, bs = 16, 32
    # 1 + (2i+1)·2⁻⁸: halfway between bf16 neighbours; even i rounds down to even, odd i up, half-up differs
    absmax = 1.0 + (2 * torch.arange(blocks, dtype=torch.float64) + 1) * 2.0 ** -8
    absmax = torch.cat([absmax, -absmax[:1] * 3]).float()  # and one negative-scaled block
    numel = (blocks + 1) * bs
    packed = torch.full((numel // 2,), 0xFF, dtype=torch.uint8)  # every code 15 (value 1.0)
    packed[-4:] = 0x0F  # and a few code 0 (-1.0) / code 15 pairs
    code = torch.tensor(NF4_CODE_VALUES, dtype=torch.float32)
    ref = fmt.dequantize_nf4_torch(packed, absmax, numel, bs, torch.bfloat16)
    assert (ref[:bs * blocks:bs].float() != absmax[:blocks]).all()  # every block is a tie
    for config in (dict(BLOCK=256, DECODE=DECODE_GATHER, num_warps=4), dict(BLOCK=64, DECODE=DECODE_SELECT,
                                                                              num_warps=4, ROW4=True)):
        out = nf4_dequantize(packed, absmax, numel, bs, torch.bfloat16, code, config=config)
        assert torch.equal(out, ref), (config, (out != ref).nonzero()[:4].flatten().tolist())
