"""Host-side edges of the Triton launchers under the interpreter (each a mutation that survived the suite): empty
reductions return zeros (CD1, DR1), a scratch `out` of another dtype is refused (ND1), and strided bias / norm-weight
vectors are made contiguous before the kernels read them at ptr + n (LG1, NG2, SH3)."""
import pytest
import torch

from tests.utils import interpreter_only

pytestmark = interpreter_only


def test_column_dot_of_no_rows_is_zero():
    from fastft.kernels.column_dot import column_dot
    assert column_dot(torch.zeros(0, 5), torch.zeros(0, 5)).tolist() == [0.0] * 5


def test_row_sq_norm_of_no_columns_is_zero():
    from fastft.kernels.dora_row_norm import row_sq_norm
    assert row_sq_norm(torch.zeros(5, 0), torch.zeros(16, 0), torch.zeros(5, 16), 1.0).tolist() == [0.0] * 5


def _nf4(numel):
    from fastft.quant.nf4_format import dequantize_nf4_torch, quantize_nf4_torch
    x = torch.randn(numel, generator=torch.Generator().manual_seed(0))
    packed, absmax = quantize_nf4_torch(x, 64)
    return packed, absmax, dequantize_nf4_torch(packed, absmax, numel, 64, torch.float32)


def test_dequantize_refuses_an_out_of_another_dtype():
    from fastft.kernels.nf4_dequant import nf4_dequantize
    from fastft.quant.nf4_format import nf4_code
    packed, absmax, _ = _nf4(128)
    with pytest.raises(ValueError, match="must be a contiguous"):
        nf4_dequantize(packed, absmax, 128, 64, torch.bfloat16, nf4_code(), out=torch.empty(128))


def test_lora_gemm_strided_bias():
    from fastft.kernels.lora_gemm import lora_gemm
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(8, 32, generator=g), torch.randn(24, 32, generator=g)
    bias = torch.randn(48, generator=g)[::2]
    torch.testing.assert_close(lora_gemm(a, b, None, None, bias, b_nk=True), a @ b.t() + bias, rtol=1e-5, atol=1e-4)


def test_nf4_gemm_strided_bias():
    from fastft.kernels.nf4_gemm import NF4Operand, nf4_lora_gemm
    from fastft.quant.nf4_format import dequantize_nf4_torch, nf4_code, quantize_nf4_torch
    g = torch.Generator().manual_seed(0)
    N, K = 32, 64
    packed, absmax = quantize_nf4_torch(torch.randn(N, K, generator=g), 64)
    W = dequantize_nf4_torch(packed, absmax, N * K, 64, torch.float32).view(N, K)
    w = NF4Operand(packed, absmax, None, None, 0.0, 256, nf4_code(), 64, N, K)
    a, bias = torch.randn(8, K, generator=g), torch.randn(2 * N, generator=g)[::2]
    torch.testing.assert_close(nf4_lora_gemm(a, w, None, None, bias, w_nk=True), a @ W.t() + bias, rtol=1e-5, atol=1e-4)


def test_ops_strided_bias_and_norm_weight():
    """The user-level ops with a strided bias / norm weight (SH3: unit_stride made a no-op survived)."""
    from fastft.ops.lora import lora_linear, lora_linear_reference
    from fastft.ops.rms_norm import rms_norm
    g = torch.Generator().manual_seed(0)
    x, W = torch.randn(2, 4, 32, generator=g), torch.randn(24, 32, generator=g)
    A, B = torch.randn(8, 32, generator=g) * 0.1, torch.randn(24, 8, generator=g) * 0.1
    bias = torch.randn(48, generator=g)[::2]
    torch.testing.assert_close(lora_linear(x, W, bias, A, B, 2.0, backend="triton"),
                               lora_linear_reference(x, W, bias, A, B, 2.0), rtol=1e-5, atol=1e-4)
    h, w = torch.randn(4, 32, generator=g), torch.randn(64, generator=g)[::2]
    torch.testing.assert_close(rms_norm(h, w, 1e-6, backend="triton"),
                               rms_norm(h, w.contiguous(), 1e-6, backend="torch"))
