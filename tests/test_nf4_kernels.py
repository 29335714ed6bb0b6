"""Triton NF4 kernels through the interpreter: dequantization (bit-exact) and the NF4 GEMM with its LoRA tail."""
import pytest
import torch

from fastft.quant import quantize_nf4
from fastft.quant import nf4_format as fmt
from tests.utils import assert_close, interpreter_only

pytestmark = interpreter_only

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _dequant_configs():
    """Both decodes in both byte layouts (ROW4: the tuner's default layout since 2026-12-05), with BLOCK below
    and above the blocksizes."""
    from fastft.kernels.nf4_dequant import DECODE_GATHER, DECODE_SELECT
    return [dict(BLOCK=256, DECODE=DECODE_GATHER, num_warps=4), dict(BLOCK=64, DECODE=DECODE_SELECT, num_warps=4),
            dict(BLOCK=256, DECODE=DECODE_GATHER, num_warps=4, ROW4=True),
            dict(BLOCK=64, DECODE=DECODE_SELECT, num_warps=4, ROW4=True),
            dict(BLOCK=1024, DECODE=DECODE_GATHER, num_warps=4, ROW4=True)]


def _dequant(w, dtype, config):
    from fastft.kernels.nf4_dequant import nf4_dequantize
    return nf4_dequantize(w.packed, w.absmax, w.numel(), w.blocksize, dtype, w.code, absmax2=w.absmax2,
                          code2=w.code2, offset=w.offset, nested_blocksize=w.nested_blocksize, config=config)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("blocksize,numel", [(32, 1001), (64, 4096), (128, 777), (512, 1030)])
@pytest.mark.parametrize("double_quant", [False, True])
def test_dequant_kernel_is_bit_exact(dtype, blocksize, numel, double_quant):
    x = (torch.randn(numel) * 2).to(dtype)
    w = quantize_nf4(x, blocksize=blocksize, double_quant=double_quant)
    ref = fmt.dequantize_nf4_torch(w.packed, w.block_absmax(), numel, blocksize, dtype)
    for config in _dequant_configs():
        out = _dequant(w, dtype, config)
        assert torch.equal(out, ref), config


def test_dequant_row4_needs_a_block_of_whole_rows():
    w = quantize_nf4(torch.randn(300), blocksize=64)
    with pytest.raises(ValueError, match="ROW4 config needs BLOCK % 8 == 0"):
        _dequant(w, torch.float32, dict(BLOCK=36, DECODE=0, num_warps=4, ROW4=True))


def test_dequant_kernel_other_output_dtypes():
    w = quantize_nf4(torch.randn(3, 100, dtype=torch.bfloat16), blocksize=64)
    for dtype in DTYPES:
        ref = fmt.dequantize_nf4_torch(w.packed, w.block_absmax(), 300, 64, dtype)
        assert torch.equal(_dequant(w, dtype, _dequant_configs()[0]), ref)


def _gemm(a, w, lo, t, bias, w_nk, p_drop=0.0, seed=0, decode=None):
    from fastft.kernels.nf4_gemm import gemm_configs, nf4_lora_gemm
    config = dict(gemm_configs(a.element_size())[0])
    if decode is not None:
        config["DECODE"] = decode
    return nf4_lora_gemm(a, w.kernel_operand(), lo, t, bias, w_nk=w_nk, p_drop=p_drop, seed=seed, config=config)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,N,K,blocksize,double_quant", [(37, 48, 64, 64, True), (1, 70, 128, 32, False),
                                                          (65, 33, 256, 128, True)])
@pytest.mark.parametrize("decode", [0, 1])
def test_gemm_forward_and_dx_orientation(dtype, M, N, K, blocksize, double_quant, decode):
    w = quantize_nf4(torch.randn(N, K, dtype=dtype) * 0.1, blocksize=blocksize, double_quant=double_quant)
    W = w.dequantize(torch.float32).double()
    x = torch.randn(M, K, dtype=dtype)
    bias = torch.randn(N, dtype=dtype)
    y = _gemm(x, w, None, None, bias, True, decode=decode)
    assert_close(y, x.double() @ W.T + bias.double(), dtype, "x·Wᵀ + b")
    dy = torch.randn(M, N, dtype=dtype)
    dx = _gemm(dy, w, None, None, None, False, decode=decode)
    assert_close(dx, dy.double() @ W, dtype, "dy·W")


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_gemm_lora_tail_pointer_path(dtype):
    # a non-contiguous x takes the pointer-load path (no tensor descriptors)
    from fastft.kernels.rank_ops import dropout_mask
    M, N, K, R = 50, 40, 96, 16
    w = quantize_nf4(torch.randn(N, K) * 0.1, blocksize=32)
    W = w.dequantize(torch.float32).double()
    x = torch.randn(K, M, dtype=dtype).t()
    lo = torch.randn(M, R, dtype=dtype)
    B = torch.randn(N, R, dtype=dtype)
    y = _gemm(x, w, lo, B, None, True)
    assert_close(y, x.double() @ W.T + lo.double() @ B.double().T, dtype, "forward tail")
    A = torch.randn(R, K, dtype=dtype)
    dy = torch.randn(N, M, dtype=dtype).t()
    dx = _gemm(dy, w, lo, A, None, False, p_drop=0.3, seed=1234)
    keep = dropout_mask(1234, M, K, 0.3, "cpu")
    assert_close(dx, dy.double() @ W + (lo.double() @ A.double()) * keep, dtype, "dx tail with dropout")
