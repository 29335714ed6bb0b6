"""lora_gemm_folded returns (c, lo) with c = lora_gemm(a, b, lo, t, bias): the tail must use lo as rounded to
a's dtype (what it stores and what backward reads as xs), not its fp32 accumulator. Bitwise under the
interpreter: the same tiles, the same accumulation order."""
import pytest
import torch

from fastft.kernels import lora_gemm
from tests.utils import interpreter_only


@interpreter_only
@pytest.mark.parametrize("b_nk", [True, False])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_folded_gemm_equals_the_plain_gemm_on_its_own_lo(b_nk, dtype):
    gen = torch.Generator().manual_seed(0)
    M, K, N, R, s = 40, 48, 45, 16, 0.7
    a = torch.randn(M, K, generator=gen).to(dtype)
    w = (torch.randn(N, K, generator=gen) * 0.2).to(dtype)
    p = (torch.randn(K, R, generator=gen) * 0.5).to(dtype)
    t = (torch.randn(N, R, generator=gen) * 0.5).to(dtype)
    if b_nk:
        bias = torch.randn(N, generator=gen)
        c, lo = lora_gemm.lora_gemm_folded(a, w, p.t().contiguous(), t, bias, b_nk=True, scale=s)
        plain = lora_gemm.lora_gemm(a, w, lo, t, bias, b_nk=True)
    else:
        wt, tt = w.t().contiguous(), t.t().contiguous()
        c, lo = lora_gemm.lora_gemm_folded(a, wt, p, tt, None, b_nk=False, scale=s)
        plain = lora_gemm.lora_gemm(a, wt, lo, tt, None, b_nk=False)
    assert torch.equal(c, plain)
