"""lora_linear's Triton backward with dropout when only one LoRA factor is trainable: fused_lora_backward then takes
its single-factor paths (rank_reduce for dA alone when lora_B is frozen; for dB alone when lora_A is frozen) instead
of rank_reduce_pair. The fuzz tests always train both factors, so these paths ran unchecked: dA alone must still
apply the forward's keep-mask (dA = s·(dy·B)ᵀ·(keep∘x)/(1-p))."""
from unittest import mock

import pytest
import torch

from fastft.ops import shared
from fastft.ops.lora import lora_linear, lora_linear_reference
from tests.utils import TOL, interpreter_only


@interpreter_only
@pytest.mark.parametrize("frozen", ["lora_B", "lora_A"])
@pytest.mark.parametrize("dtype,scaling", [(torch.float32, 2.0), (torch.float16, 16.0)])
def test_lora_dropout_gradients_with_one_factor_frozen(frozen, dtype, scaling):
    from fastft.kernels.rank_ops import dropout_mask

    M, K, N, r, p = 37, 48, 40, 8, 0.3
    g = torch.Generator().manual_seed(0)
    x = torch.randn(M, K, generator=g)
    W = torch.randn(N, K, generator=g) * K ** -0.5
    A = torch.randn(r, K, generator=g) * K ** -0.5
    B = torch.randn(N, r, generator=g) * 0.1
    dy = torch.randn(M, N, generator=g)
    leaves = {"x": x.to(dtype), "lora_A": A, "lora_B": B}  # fp32 adapters, as peft keeps them
    for n, t in leaves.items():
        t.requires_grad_(n != frozen)
    seeds = []
    draw = shared.draw_seed
    with mock.patch.object(shared, "draw_seed", lambda: seeds.append(draw()) or seeds[-1]):
        y = lora_linear(leaves["x"], W.to(dtype), None, leaves["lora_A"], leaves["lora_B"], scaling, p,
                        backend="triton")
    trainable = [n for n in leaves if n != frozen]
    got = torch.autograd.grad(y, [leaves[n] for n in trainable], dy.to(dtype))
    assert len(seeds) == 1
    keep = dropout_mask(seeds[0], M, K, p, x.device)

    ref = {n: t.detach().double().requires_grad_(n != frozen) for n, t in leaves.items()}
    y64 = lora_linear_reference(ref["x"], W.to(dtype).double(), None, ref["lora_A"], ref["lora_B"], scaling, p,
                                keep_mask=keep)
    want = torch.autograd.grad(y64, [ref[n] for n in trainable], dy.to(dtype).double())
    assert (y.double() - y64).norm() / y64.norm() < TOL[dtype]
    for n, a, b in zip(trainable, got, want):
        err = ((a.double() - b).norm() / b.norm()).item()
        assert err < TOL[dtype], f"{n}: rel err {err:.2e} (frozen {frozen}, {dtype})"
