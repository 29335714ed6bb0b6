"""fp16 LoRA dA precision at a scaling s < 1 (alpha/r = 0.05). The fp16 backward stores the rank intermediate
g' = a·dy·B with a = s for s < 1 (ops.lora.split_scaling): all of s's negative exponent shrinks g' toward fp16's
subnormal range (< 6.1e-5), so with a small dy (or a small B, early in training) dA = g'ᵀ·x lost 10-20× in
precision (5e-3 off fp64; the torch backend / peft's fp32 rank path: 3e-7, fastft at dy ~ 1: 3e-4). Keeping only
s's mantissa in g' and its power of two t in the dx tail (t·A) and the fp32 dA sum keeps dA at fp16 rounding.
"""
import math

import pytest
import torch

from fastft.ops import dora_linear, lora_linear
from fastft.ops.lora import lora_linear_reference, split_scaling
from tests.utils import interpreter_only


def _rel(a, b):
    assert torch.isfinite(a).all()
    return ((a.double() - b).norm() / b.norm()).item()


@pytest.mark.parametrize("s", [0.05, 0.3, -0.7, 0.5, 2.0 ** -5, 1e-4, 1.0, 16.0, 5.657, 1e-8])
def test_split_scaling_keeps_the_intermediates_at_the_mantissa_of_s(s):
    a, b = split_scaling(s, torch.float16)
    assert math.frexp(b)[0] == 0.5  # a power of two: b·B, b·A and b·(fp32 sums) exact
    assert a * b == s  # s undone exactly
    assert abs(a) <= 1.0  # xs = a·x·Aᵀ and g' = a·dy·B no larger than x·Aᵀ and dy·B: no new fp16 overflow
    if abs(s) >= 2.0 ** -8:
        assert abs(a) >= 0.5  # no more of s's exponent in xs and g' than needed


@interpreter_only
@pytest.mark.parametrize("path", ["split", "fold"])
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_lora_fp16_dA_at_small_scaling_and_small_dy(monkeypatch, path, p):
    monkeypatch.setenv("FASTFT_LORA_PATH", path)
    from fastft.ops import shared
    from fastft.kernels.rank_ops import dropout_mask

    seeds = []
    draw = shared.draw_seed
    monkeypatch.setattr(shared, "draw_seed", lambda: seeds.append(draw()) or seeds[-1])
    M, K, N, r, s = 200, 130, 48, 16, 0.05
    g = torch.Generator().manual_seed(0)
    x = torch.randn(M, K, generator=g).half()
    w = (torch.randn(N, K, generator=g) * K ** -0.5).half()
    A = (torch.rand(r, K, generator=g) * 2 - 1) * K ** -0.5  # fp32 masters, as peft keeps them
    B = torch.randn(N, r, generator=g) * 0.1
    dy = (torch.randn(M, N, generator=g) * 1e-4).half()  # |s·dy·B| ~ 5e-6: fp16 subnormal; |dy·B| ~ 1e-4 is not
    leaves = [t.clone().requires_grad_() for t in (x, A, B)]
    got = torch.autograd.grad(lora_linear(*leaves[:1], w, None, *leaves[1:], s, p, backend="triton"), leaves, dy)
    keep = dropout_mask(seeds[0], M, K, p, "cpu") if p > 0 else None
    leaves64 = [t.double().requires_grad_() for t in (x, A, B)]
    y64 = lora_linear_reference(leaves64[0], w.double(), None, *leaves64[1:], s, p, keep_mask=keep)
    want = torch.autograd.grad(y64, leaves64, dy.double())
    errs = {n: _rel(a, b) for n, a, b in zip(("dx", "dA", "dB"), got, want)}
    # fp16 rounding of g' and of the fp16 operands: ~3e-4 at dy ~ 1 (and with the fix here); 4.8e-3 before it
    assert errs["dA"] < 1e-3, errs
    assert errs["dx"] < 2e-3 and errs["dB"] < 2e-3, errs


@interpreter_only
@pytest.mark.parametrize("s", [0.05, 2.0 ** -12, 0.3])
def test_dora_fp16_gradients_at_small_scaling(s):
    """DoRA shares split_scaling and backward_operands (B itself for g', not b·B)."""
    from fastft.ops.dora import dora_linear_reference

    M, K, N, r = 37, 48, 40, 4
    g = torch.Generator().manual_seed(1)
    x = torch.randn(M, K, generator=g).half()
    w = (torch.randn(N, K, generator=g) * K ** -0.5).half()
    A = (torch.rand(r, K, generator=g) * 2 - 1) * K ** -0.5
    B = torch.randn(N, r, generator=g) * 0.5
    m = (w.double() + s * B.double() @ A.double()).norm(dim=1).float()
    dy = (torch.randn(M, N, generator=g) * 1e-3).half()
    leaves = [t.clone().requires_grad_() for t in (x, A, B, m)]
    got = torch.autograd.grad(dora_linear(leaves[0], w, None, *leaves[1:3], leaves[3], s, backend="triton"),
                              leaves, dy)
    leaves64 = [t.double().requires_grad_() for t in (x, A, B, m)]
    want = torch.autograd.grad(dora_linear_reference(leaves64[0], w.double(), None, *leaves64[1:3], leaves64[3], s),
                               leaves64, dy.double())
    errs = {n: _rel(a, b) for n, a, b in zip(("dx", "dA", "dB", "dm"), got, want)}
    assert all(e < 5e-3 for e in errs.values()), errs
