"""Llama's RMSNorm with an fp32 weight on bf16/fp16 activations (mixed precision without autocast) rounds x̂ to
the activation dtype before ·w and returns fp32: the kernel must round x̂ there too (CAST_INPUT), not skip it
because y is fp32. The fp64 tolerance cannot see a missing rounding; equality with transformers can."""
import pytest
import torch

from fastft.ops import rms_norm
from tests.utils import interpreter_only


@interpreter_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rms_norm_fp32_weight_rounds_xhat_to_the_input_dtype(dtype):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(7, 96, generator=gen) * 3).to(dtype)
    module = LlamaRMSNorm(96, eps=1e-6)  # weight stays fp32
    with torch.no_grad():
        module.weight.copy_(torch.randn(96, generator=gen) * 0.3 + 1)
    want = module(x)
    got = rms_norm(x, module.weight, 1e-6, offset=0.0, backend="triton")
    assert want.dtype == got.dtype == torch.float32
    # x̂ rounded to dtype, times an fp32 weight: equal to transformers except where rstd's last fp32 bit moves a tie
    assert (got == want).float().mean() > 0.95
    # and every x̂ = y / w is a value of the input dtype
    xhat = got.double() / module.weight.detach().double()
    assert (xhat.to(dtype).double() - xhat).abs().max() <= 1e-6 * xhat.abs().max()
