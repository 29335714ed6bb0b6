"""fastft.kernels.shared.tanh is accurate to a few fp32 ulp everywhere, in particular for small |x|, where the
(1 − e)/(1 + e) form cancels (its Taylor branch covers |x| < 0.5)."""
import torch
import triton
import triton.language as tl

from fastft.kernels.shared import tanh
from tests.utils import interpreter_only


@triton.jit
def _tanh_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    tl.store(y_ptr + offs, tanh(tl.load(x_ptr + offs, mask=m, other=0.0)), mask=m)


@interpreter_only
def test_tanh_within_a_few_ulp():
    x = torch.cat([torch.linspace(-0.6, 0.6, 4097), torch.linspace(-8, 8, 1025),
                   torch.logspace(-6, 0, 512)]).float()
    y = torch.empty_like(x)
    _tanh_kernel[(triton.cdiv(x.numel(), 1024),)](x, y, x.numel(), BLOCK=1024)
    ref = torch.tanh(x.double())
    ulp = torch.finfo(torch.float32).eps * ref.abs().clamp_min(torch.finfo(torch.float32).tiny)
    err = ((y.double() - ref).abs() / ulp).max().item()
    assert err <= 3.0, f"tanh off by {err:.1f} ulp"
