"""The Triton backend's fp16 backward stores the rank intermediate as g' = a·dy·B, not g = s·dy·B (ops.lora
split_scaling's s = a·b, b applied to A in the dx tail and to the fp32 dA sum). With all
of s in g, a GradScaler-scaled dy overflowed g (inf dx and dA: the step skipped) at a loss scale 4-8× below peft's
fp32 rank path (tiny fp16 Llama, alpha/r = 16: 2^18 against 2^20). Here |s·dy·B| > 65504 > |a·dy·B|: every
gradient must be finite and match fp64, for LoRA (split and fold paths), QLoRA and DoRA; bf16/fp32 do not split.
On the CPU through the interpreter; the "cuda" cases are in benchmarks/gpu_check.sh's kernel-tests (-m gpu)."""
import pytest
import torch

from fastft.ops import dora_linear, lora_linear, qlora_linear
from fastft.ops.lora import split_scaling, tail_factor
from fastft.quant import quantize_nf4
from tests.utils import INTERPRET

DEVICES = [pytest.param("cpu", marks=pytest.mark.skipif(not INTERPRET, reason="the CPU runs Triton interpreted")),
           pytest.param("cuda", marks=pytest.mark.gpu)]

M, K, N, R = 33, 64, 48, 4
SCALING = 16.0  # alpha/r = 16: a = 1, b = 16


def _inputs(seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g).half()
    w = (torch.randn(N, K, generator=g) * K**-0.5).half()
    A = torch.randn(R, K, generator=g) * 0.05  # fp32 adapters, as peft keeps them
    B = torch.randn(N, R, generator=g)
    dy = (torch.randn(M, N, generator=g) * 1000).half()  # a loss-scaled upstream gradient
    return tuple(t.to(device) for t in (x, w, A, B, dy))


def _grads(fn, x, A, B, dy, *extra):
    leaves = [t.clone().requires_grad_() for t in (x, A, B, *extra)]
    y = fn(*leaves)
    return [y] + list(torch.autograd.grad(y, leaves, dy.to(y.dtype)))


def _reference(x, w, A, B, dy):
    """fp64: y = x·Wᵀ + s·x·Aᵀ·Bᵀ and its gradients."""
    return _grads(lambda x, A, B: x @ w.double().t() + SCALING * (x @ A.t()) @ B.t(),
                  x.double(), A.double(), B.double(), dy.double())


def _assert_finite_and_close(got, want):
    for name, a, b in zip(("y", "dx", "dA", "dB"), got, want):
        assert torch.isfinite(a).all(), f"{name} is not finite"
        err = (a.double() - b).norm() / b.norm()
        assert err < 5e-3, f"{name}: relative error {err:.2e}"


def test_the_stored_intermediate_is_no_larger_than_peft_s():
    x, w, A, B, dy = _inputs()
    assert (SCALING * dy.double() @ B.double()).abs().max() > 65504  # g = s·dy·B overflows fp16
    g_scale, b = split_scaling(SCALING, torch.float16)
    assert b == 16.0 and g_scale == 1.0 and torch.equal(tail_factor(A, b), A * 16)  # g' = a·dy·B = dy·B
    assert (g_scale * dy.double() @ B.double()).abs().max() < 65504 / 2
    for dtype in (torch.bfloat16, torch.float32):  # no split: one scale, A itself
        g_scale, b = split_scaling(SCALING, dtype)
        assert (g_scale, b) == (SCALING, 1.0) and tail_factor(A, b) is A


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("path", ["split", "fold"])
def test_lora_fp16_backward_is_finite_where_s_dy_b_overflows(path, device, monkeypatch):
    monkeypatch.setenv("FASTFT_LORA_PATH", path)
    x, w, A, B, dy = _inputs(device=device)
    got = _grads(lambda x, A, B: lora_linear(x, w, None, A, B, SCALING, backend="triton"), x, A, B, dy)
    _assert_finite_and_close(got, _reference(x, w, A, B, dy))


@pytest.mark.parametrize("device", DEVICES)
def test_qlora_fp16_backward_is_finite_where_s_dy_b_overflows(device):
    x, w, A, B, dy = _inputs(1, device)
    q = quantize_nf4(w.float(), blocksize=64)
    dense = q.dequantize(torch.float16)
    got = _grads(lambda x, A, B: qlora_linear(x, q, None, A, B, SCALING, backend="triton"), x, A, B, dy)
    _assert_finite_and_close(got, _reference(x, dense, A, B, dy))


@pytest.mark.parametrize("device", DEVICES)
def test_dora_fp16_backward_is_finite_where_s_dy_b_overflows(device):
    x, w, A, B, dy = _inputs(2, device)
    B = B * 0.2  # DoRA divides by the adapted row norms: keep s·B·A the size of W
    magnitude = (w.double() + SCALING * B.double() @ A.double()).norm(dim=1).float()
    dy = dy * 3  # the same overflow of s·dy·B with the smaller B
    assert (SCALING * dy.double() @ B.double()).abs().max() > 65504

    def reference(x, A, B, m):
        merged = w.double() + SCALING * B @ A
        return x @ (merged * (m / merged.norm(dim=1).detach())[:, None]).t()

    want = _grads(reference, x.double(), A.double(), B.double(), dy.double(), magnitude.double())
    got = _grads(lambda x, A, B, m: dora_linear(x, w, None, A, B, m, SCALING, backend="triton"),
                 x, A, B, dy, magnitude)
    _assert_finite_and_close(got[:4], want[:4])
    assert torch.isfinite(got[4]).all()
