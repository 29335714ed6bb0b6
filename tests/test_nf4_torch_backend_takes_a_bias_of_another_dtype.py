"""qlora_linear and nf4_linear on the torch backend take a float bias in another dtype than x (an fp32 bias on a bf16
layer), as the fused kernels do (they add it in fp32): the reference casts it to x's dtype. Mutation run 18: passing
it uncast (F.linear then refuses the mixed dtypes) failed no test."""
import torch
import torch.nn.functional as F

from fastft.ops.qlora import nf4_linear, qlora_linear
from fastft.quant.nf4_weight import quantize_nf4


def test_fp32_bias_on_a_bf16_nf4_layer():
    g = torch.Generator().manual_seed(0)
    N, K, r = 8, 64, 2
    qw = quantize_nf4(torch.randn(N, K, generator=g).bfloat16(), blocksize=64)
    x = torch.randn(3, K, generator=g).bfloat16()
    bias = torch.randn(N, generator=g)  # fp32
    A, B = torch.randn(r, K, generator=g).bfloat16(), torch.randn(N, r, generator=g).bfloat16()
    W = qw.dequantize(torch.bfloat16)
    base = F.linear(x, W, bias.bfloat16())
    assert torch.equal(nf4_linear(x, qw, bias, backend="torch"), base)
    want = base + 0.5 * F.linear(F.linear(x, A), B)
    torch.testing.assert_close(qlora_linear(x, qw, bias, A, B, 0.5, backend="torch"), want)
