"""Gemma's rounding (offset 1, cast "fp32"): (1 + w)·x̂ computed in fp32 and rounded once to x's dtype, bit for bit
what transformers' Gemma2RMSNorm returns for a bf16 input with an fp32 weight (rounding x̂ and w to bf16 first
gives other bits)."""
import torch

from fastft.ops import rms_norm, rms_norm_reference


def test_gemma_rounding_is_bitwise_gemma2():
    from transformers.models.gemma2.modeling_gemma2 import Gemma2RMSNorm

    torch.manual_seed(0)
    norm = Gemma2RMSNorm(256, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_(0.0, 0.3)
    x = torch.randn(4, 8, 256, dtype=torch.bfloat16)
    want = norm(x)
    for got in (rms_norm(x, norm.weight, 1e-6, offset=1.0, backend="torch"),
                rms_norm_reference(x, norm.weight, 1e-6, offset=1.0)):
        assert got.dtype == want.dtype
        assert torch.equal(got, want)
