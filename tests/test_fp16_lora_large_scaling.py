"""fp16 LoRA, QLoRA and DoRA on the fused kernels at a large scaling (fuzz-found, 2026-12-06). split_scaling put all
of s's power of two into b, and the forward's B_p = b·B is stored in fp16: at s = 40000, b = 2^16 and B_p = inf for
|B| = 1, so y was inf where the torch backend (and fp64) gave 24. b is now at most 2^8 (ops.lora._MAX_B_EXP), the
rest of s in a: outputs and gradients stay finite and at fp16 rounding of fp64."""
import pytest
import torch

from fastft.ops import dora_linear, lora_linear, qlora_linear
from fastft.ops.lora import split_scaling
from tests.utils import interpreter_only


@pytest.mark.parametrize("s", [257.0, 300.0, 4e4, 7e4, -1e5, 2.0 ** 20])
def test_split_scaling_caps_b_and_puts_the_rest_in_a(s):
    a, b = split_scaling(s, torch.float16)
    assert a * b == s
    assert b == 2.0 ** 8  # a power of two no larger than 2^8: b·B and b·A fit fp16 for |B|, |A| < 256
    assert abs(a) > 1.0


def _leaves(g, M, K, N, r):
    x = (torch.randn(M, K, generator=g) * 0.02).half()
    A = torch.randn(r, K, generator=g) * 0.02  # fp32 masters, as peft keeps them
    B = torch.randn(N, r, generator=g)  # |B| ~ 1: B_p = 2^16·B was inf
    return x, A, B


def _rel(got, want):
    assert torch.isfinite(got).all(), "inf/nan in the fused result"
    return ((got.double() - want).norm() / want.norm()).item()


@interpreter_only
@pytest.mark.parametrize("op", ["lora", "qlora", "dora"])
def test_fused_fp16_ops_stay_finite_and_exact_at_s_40000(op):
    from fastft.quant.nf4_weight import quantize_nf4

    g = torch.Generator().manual_seed(0)
    M, K, N, r, s = 37, 64, 48, 4, 4e4
    x, A, B = _leaves(g, M, K, N, r)
    w = (torch.randn(N, K, generator=g) * K ** -0.5).half()
    if op == "qlora":
        w = quantize_nf4(w, blocksize=32)
    dense = (w.dequantize() if op == "qlora" else w).double()
    m = dense.norm(dim=1) * 1.1  # DoRA's magnitude, not the weight's own norm: the direction term matters

    def call(backend, x, A, B):
        if op == "lora":
            return lora_linear(x, w, None, A, B, s, backend=backend)
        if op == "qlora":
            return qlora_linear(x, w, None, A, B, s, backend=backend)
        return dora_linear(x, w, None, A, B, m.to(torch.float32), s, backend=backend)

    dy = torch.randn(M, N, generator=g).half()
    leaves = [t.clone().requires_grad_() for t in (x, A, B)]
    y = call("triton", *leaves)
    got = torch.autograd.grad(y, leaves, dy)
    # fp64 from the same operands (the reference of each op is its torch backend, run here in fp64)
    leaves64 = [t.double().requires_grad_() for t in (x, A, B)]
    z = leaves64[0] @ dense.t() + s * (leaves64[0] @ leaves64[1].t()) @ leaves64[2].t()
    if op == "dora":
        direction = dense + s * leaves64[2] @ leaves64[1]
        z = (leaves64[0] @ direction.t()) * (m / direction.norm(dim=1).detach())
    want = torch.autograd.grad(z, leaves64, dy.double())
    assert _rel(y, z.detach()) < 2e-3
    for name, a, b in zip(("dx", "dA", "dB"), got, want):
        assert _rel(a, b) < 5e-3, name
