"""Regressions from a review of the LoRA / DoRA / IA3 / GLU / bottleneck kernels and the fused losses:
- fp16 with a large LoRA scaling: the stored rank intermediate x·Aᵀ held s and overflowed where peft stays finite;
- reduction="none" losses recompute their chunks in backward from labels / teacher rows: an in-place change of
  those before backward must be refused (autograd's version check), not silently used;
- out_features 0 (DoRA, IA3) and hidden size 0 (the fused losses) give empty or reference results, no crash;
- fp64 is refused by backend="triton" (the kernels compute in fp32) and sent to torch by backend="auto".
Small sizes: the Triton kernels run through the interpreter on CPU."""
from __future__ import annotations

import importlib
import math

import pytest
import torch
import torch.nn.functional as F

from fastft.ops import (bottleneck_adapter as bottleneck_module, dora as dora_module, glu as glu_module,
                        ia3 as ia3_module, lora as lora_module, shared)
from fastft.ops import (dora_linear, dora_linear_reference, geglu, ia3_linear, ia3_linear_reference,
                        linear_cross_entropy, linear_cross_entropy_reference, linear_kl_div, linear_kl_div_reference,
                        linear_sequence_logprobs, lora_linear, lora_linear_reference, qlora_linear, swiglu)
from fastft.ops.bottleneck_adapter import bottleneck_adapter, bottleneck_adapter_reference
from fastft.ops.rms_norm import rms_norm, rms_norm_reference
from fastft.ops.rope import rope, rope_, rope_reference
from fastft.quant import quantize_nf4
from tests.utils import INTERPRET, assert_close, interpreter_only

BACKENDS = ["torch"] + (["triton"] if INTERPRET else [])
# the modules, not the functions fastft.ops exports under the same names
rms_norm_module, rope_module = (importlib.import_module(f"fastft.ops.{name}") for name in ("rms_norm", "rope"))


# ---------------------------------------------------------------------------------------------- fp16 large scaling
def _big_rank_product_inputs(M=6, K=64, N=40, r=8):
    """|x·Aᵀ| ≈ 3800: in fp16's range, but not once multiplied by s = 32; the LoRA term s·(x·Aᵀ)·Bᵀ ≈ 1000 and y are
    in range, as are all gradients (A and B are fp32 masters, as peft keeps them)."""
    x = (40.0 + torch.randn(M, K)).half()
    W = (torch.randn(N, K) * 0.01).half()
    A = 1.5 + 0.1 * torch.randn(r, K)
    B = 1e-3 * (1.0 + 0.1 * torch.randn(N, r))
    return x, W, A, B


def _leaves(*tensors, dtype=None):
    return [t.detach().to(dtype or t.dtype).requires_grad_() for t in tensors]


@interpreter_only
@pytest.mark.parametrize("op", ["lora split", "lora fold", "lora dropout", "qlora", "dora"])
def test_fp16_large_scaling_stays_finite_and_accurate(monkeypatch, captured_seeds, op):
    from fastft.kernels.rank_ops import dropout_mask

    monkeypatch.setenv("FASTFT_LORA_PATH", "fold" if op == "lora fold" else "split")
    s, p = 32.0, (0.1 if op == "lora dropout" else 0.0)
    x0, W, A0, B0 = _big_rank_product_inputs()
    x, A, B = _leaves(x0, A0, B0)
    x64, A64, B64 = _leaves(x0, A0, B0, dtype=torch.float64)
    if op == "qlora":
        qw = quantize_nf4(W, blocksize=64)
        y = qlora_linear(x, qw, None, A, B, s, backend="triton")
        y64 = lora_linear_reference(x64, qw.dequantize(torch.float32).double(), None, A64, B64, s)
    elif op == "dora":
        m = (torch.rand(W.shape[0]) + 0.5).half()
        y = dora_linear(x, W, None, A, B, m, s, backend="triton")
        y64 = dora_linear_reference(x64, W.double(), None, A64, B64, m.double(), s)
    else:
        y = lora_linear(x, W, None, A, B, s, p, backend="triton")
        keep = dropout_mask(captured_seeds[0], *x.shape, p, "cpu") if p else None
        y64 = lora_linear_reference(x64, W.double(), None, A64, B64, s, p, keep_mask=keep)
    dy = torch.randn(y.shape)
    y.backward(dy.half())
    y64.backward(dy.double())
    assert 100 < y64.abs().max() < 2e3  # the case: y well inside fp16's range
    assert_close(y, y64, torch.float16, "y")
    for name, t, t64 in (("dx", x, x64), ("dA", A, A64), ("dB", B, B64)):
        assert_close(t.grad, t64.grad, torch.float16, name)


def test_split_scaling_keeps_the_intermediate_at_most_unscaled():
    from fastft.ops.lora import split_scaling

    for s in (0.0, 1.0, 2.0, 0.3, -0.7, 1.0001, 5.657, -3.0, 16.0, 1e-8, 3e5, 0.05, 2.0 ** -5):
        a, b = split_scaling(s, torch.float16)
        assert a * b == s and (abs(a) <= 1.0 or b == 2.0 ** 8)  # past |s| = 2^8 the rest stays in a (b·B fits fp16)
        assert math.frexp(b)[0] == 0.5  # a power of two: scales B exactly
        assert b >= 1.0 or s == 0.0 or abs(a) >= 0.5 or b == 2.0 ** -8  # s < 1: a keeps s's mantissa (down to 2^-8)
        for dtype in (torch.bfloat16, torch.float32):  # no overflow to guard against: no extra pass over B
            assert split_scaling(s, dtype) == (s, 1.0)


@interpreter_only
@pytest.mark.parametrize("s", [0.0, -3.0, 0.3, 5.657])
@pytest.mark.parametrize("path", ["split", "fold"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_lora_and_dora_gradients_for_any_scaling(monkeypatch, s, path, dtype):
    """The scaling split between xs and B (split_scaling, fp16 only) on both paths: every gradient against fp64."""
    monkeypatch.setenv("FASTFT_LORA_PATH", path)
    M, K, N, r = 5, 24, 20, 3
    x0, W, A0, B0, m0 = torch.randn(M, K), torch.randn(N, K) / 4, torch.randn(r, K), torch.randn(N, r), torch.rand(N)
    m0 = m0 + 0.5
    W = W.to(dtype)
    for op in ("lora", "dora"):
        x, A, B, m = _leaves(x0, A0, B0, m0, dtype=dtype)
        x64, A64, B64, m64 = _leaves(x, A, B, m, dtype=torch.float64)  # the rounded inputs
        if op == "lora":
            y, y64 = (lora_linear(x, W, None, A, B, s, backend="triton"),
                      lora_linear_reference(x64, W.double(), None, A64, B64, s))
            pairs = ((x, x64), (A, A64), (B, B64))
        else:
            y, y64 = (dora_linear(x, W, None, A, B, m, s, backend="triton"),
                      dora_linear_reference(x64, W.double(), None, A64, B64, m64, s))
            pairs = ((x, x64), (A, A64), (B, B64), (m, m64))
        dy = torch.randn(y.shape)
        y.backward(dy.to(dtype))
        y64.backward(dy.double())
        assert_close(y, y64, dtype, f"{op} y")
        for i, (t, t64) in enumerate(pairs):
            assert_close(t.grad, t64.grad, dtype, f"{op} grad {i}")


# ---------------------------------------------------------------------------------------------- in-place targets
def _per_row_loss(case, backend, h, W, labels, teacher_h, teacher_w):
    if case == "ce none":
        return linear_cross_entropy(h, W, labels, reduction="none", backend=backend).sum()
    if case == "sequence logprobs":
        return linear_sequence_logprobs(h.view(2, -1, h.shape[-1]), W, labels.view(2, -1), backend=backend).sum()
    return linear_kl_div(h, W, teacher_h, teacher_w, reduction="none", backend=backend).sum()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["ce none", "sequence logprobs", "kl none"])
def test_in_place_change_of_recomputed_targets_is_refused(backend, case):
    T, H, V = 8, 16, 32
    h, W = torch.randn(T, H, requires_grad=True), (torch.randn(V, H) / 4).requires_grad_()
    labels, teacher_h, teacher_w = torch.randint(0, V, (T,)), torch.randn(T, H), torch.randn(V, H) / 4
    loss = _per_row_loss(case, backend, h, W, labels, teacher_h, teacher_w)
    if case == "kl none":
        teacher_h.normal_()  # e.g. a teacher activation buffer reused before the student's backward
    else:
        labels.fill_(0)  # e.g. a label buffer refilled for the next micro-batch
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize("backend", BACKENDS)
def test_recomputed_targets_unchanged_still_give_the_reference_gradients(backend):
    T, H, V = 8, 16, 32
    h, W = torch.randn(T, H), torch.randn(V, H) / 4
    labels, teacher_h, teacher_w = torch.randint(0, V, (T,)), torch.randn(T, H), torch.randn(V, H) / 4
    go = torch.rand(T) + 0.5
    for kl in (False, True):
        hf, Wf = _leaves(h, W)
        h64, W64 = _leaves(h, W, dtype=torch.float64)
        if kl:
            out = linear_kl_div(hf, Wf, teacher_h, teacher_w, reduction="none", backend=backend)
            ref = linear_kl_div_reference(h64, W64, teacher_h.double(), teacher_w.double(), reduction="none")
        else:
            out = linear_cross_entropy(hf, Wf, labels, reduction="none", backend=backend)
            ref = linear_cross_entropy_reference(h64, W64, labels, reduction="none")
        out.backward(go)
        ref.backward(go.double())
        assert_close(hf.grad, h64.grad, torch.float32, "dh")
        assert_close(Wf.grad, W64.grad, torch.float32, "dW")


# ---------------------------------------------------------------------------------------------- empty sizes
@interpreter_only
def test_zero_out_features_give_empty_outputs_and_gradients():
    N, K = 0, 8
    for op in ("dora", "ia3 out", "ia3 ff"):
        grads = {}
        for backend in ("torch", "triton"):
            torch.manual_seed(0)
            x, W = torch.randn(3, K, requires_grad=True), torch.randn(N, K)
            A, B = torch.randn(2, K, requires_grad=True), torch.randn(N, 2, requires_grad=True)
            v = torch.rand(K if op == "ia3 ff" else N, requires_grad=True)
            if op == "dora":
                y = dora_linear(x, W, None, A, B, v, 1.0, backend=backend)
            else:
                y = ia3_linear(x, W, None, v, feedforward=op == "ia3 ff", backend=backend)
            assert y.shape == (3, 0)
            y.sum().backward()
            grads[backend] = [t.grad for t in (x, A, B, v) if t.grad is not None]
        assert [g.shape for g in grads["triton"]] == [g.shape for g in grads["torch"]]
        assert all(torch.equal(a, b) for a, b in zip(grads["triton"], grads["torch"])), op


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_losses_with_hidden_size_0_match_torch(backend, reduction):
    """h·Wᵀ with H = 0 is all zeros (plus the bias): the loss of uniform logits, empty dh and dW."""
    T, V = 5, 7
    h, W, b = torch.randn(T, 0), torch.randn(V, 0), torch.randn(V)
    labels = torch.randint(0, V, (T,))
    hf, Wf, bf = _leaves(h, W, b)
    h64, W64, b64 = _leaves(h, W, b, dtype=torch.float64)
    out = linear_cross_entropy(hf, Wf, labels, bias=bf, reduction=reduction, backend=backend)
    ref = F.cross_entropy(F.linear(h64, W64, b64), labels, reduction=reduction)
    go = torch.rand(out.shape) + 0.5
    out.backward(go)
    ref.backward(go.double())
    assert_close(out, ref, torch.float32, "loss")
    assert hf.grad.shape == (T, 0) and Wf.grad.shape == (V, 0)
    assert_close(bf.grad, b64.grad, torch.float32, "db")
    kl = linear_kl_div(h.requires_grad_(), W, torch.randn(T, 0), torch.randn(V, 0), reduction=reduction,
                       backend=backend)
    assert kl.abs().max() < 1e-6  # uniform against uniform
    kl.sum().backward()
    assert h.grad.shape == (T, 0)


# ---------------------------------------------------------------------------------------------- fp64
def _fp64_cases():
    d = torch.float64
    x, W = torch.randn(9, 33, dtype=d), torch.randn(17, 33, dtype=d)
    A, B, m = torch.randn(4, 33, dtype=d), torch.randn(17, 4, dtype=d), torch.rand(17, dtype=d) + 0.5
    D, U = torch.randn(4, 33, dtype=d), torch.randn(33, 4, dtype=d)
    g, u = torch.randn(9, 33, dtype=d), torch.randn(9, 33, dtype=d)
    q, angles = torch.randn(2, 3, 5, 8, dtype=d), torch.randn(2, 5, 8, dtype=d)
    cos, sin = angles.cos(), angles.sin()
    return {
        "ia3_linear out": (lambda be: ia3_linear(x, W, None, m, feedforward=False, backend=be),
                           lambda: ia3_linear_reference(x, W, None, m, False), "`x`"),
        "ia3_linear ff": (lambda be: ia3_linear(x, W, None, x[0], feedforward=True, backend=be),
                          lambda: ia3_linear_reference(x, W, None, x[0], True), "`x`"),
        "dora_linear": (lambda be: dora_linear(x, W, None, A, B, m, 0.5, backend=be),
                        lambda: dora_linear_reference(x, W, None, A, B, m, 0.5), "`x`"),
        "bottleneck_adapter": (lambda be: bottleneck_adapter(x, D, None, U, None, "silu", backend=be),
                               lambda: bottleneck_adapter_reference(x, D, None, U, None, "silu"), "`h`"),
        "swiglu": (lambda be: swiglu(g, u, backend=be), lambda: F.silu(g) * u, "`gate`"),
        # rms_norm and rope ran their fp32 kernels on fp64 inputs (fp64 out, fp32 accuracy)
        "rms_norm": (lambda be: rms_norm(x, m.repeat(2)[:33], 1e-6, backend=be),
                     lambda: rms_norm_reference(x, m.repeat(2)[:33], 1e-6), "`x`"),
        "rope": (lambda be: rope(q, q, cos, sin, backend=be)[0], lambda: rope_reference(q, q, cos, sin)[0], "`q`"),
        "rope_": (lambda be: rope_(q.clone(), q.clone(), cos, sin, backend=be)[0],
                  lambda: rope_reference(q, q, cos, sin)[0], "`q`"),
        "geglu": (lambda be: geglu(g, u, backend=be), lambda: F.gelu(g, approximate="tanh") * u, "`gate`"),
        "lora_linear": (lambda be: lora_linear(x, W, None, A, B, 0.5, backend=be),
                        lambda: lora_linear_reference(x, W, None, A, B, 0.5), "`x`"),
    }


@interpreter_only
@pytest.mark.parametrize("name", list(_fp64_cases()))
def test_fp64_is_refused_by_the_triton_backend(name):
    op, _, arg = _fp64_cases()[name]
    with pytest.raises(ValueError, match=rf"{name.split()[0]}: backend='triton' computes in float16, bfloat16 or "
                                         rf"float32; {arg} is torch.float64 \(backend='torch' takes any float dtype\)"):
        op("triton")


@pytest.fixture
def auto_as_on_cuda(monkeypatch):
    """backend='auto' decided as on a CUDA machine (the ops' resolve_backend sees a CUDA device; only its type is
    read), with Triton runnable (the interpreter runs what it picks)."""
    monkeypatch.setattr(shared, "triton_runs_on", lambda device: True)
    real = shared.resolve_backend
    for module in (ia3_module, dora_module, bottleneck_module, glu_module, lora_module, rms_norm_module, rope_module):
        monkeypatch.setattr(module, "resolve_backend",
                            lambda op, backend, device, **kw: real(op, backend, torch.device("cuda", 0), **kw))


@interpreter_only
@pytest.mark.parametrize("name", list(_fp64_cases()))
def test_auto_sends_fp64_to_torch(auto_as_on_cuda, name):
    op, reference, _ = _fp64_cases()[name]
    out, ref = op("auto"), reference()
    assert out.dtype == torch.float64
    assert ((out - ref).abs().max() / ref.abs().max()).item() < 1e-13  # fp64 accuracy, not the kernels' fp32
    assert shared.resolve_backend(name, "auto", torch.device("cuda", 0), dtype=torch.float32) == "triton"


# ----------------------------------------------------------------------------------------------- IA3 fp16, tiny l
@pytest.mark.parametrize("feedforward", [False, True])
def test_ia3_fp16_small_vector_entries_get_their_gradient(feedforward):
    """The fused path recovers dl as Σ dy⊙y / l (or Σ x⊙dx / l): in fp16, y (dx) of an entry |l| = 1e-6 is
    subnormal and dl came out 3% off (3e-8: 2×). fp16 now runs the torch path on every backend; dl matches fp64."""
    torch.manual_seed(0)
    M, K, N = 9, 37, 20
    x, W, b = torch.randn(M, K).half(), (0.2 * torch.randn(N, K)).half(), torch.randn(N).half()
    dy = torch.randn(M, N).half()
    l = torch.ones(*((1, K) if feedforward else (N, 1)), dtype=torch.float16)
    l.view(-1)[3] = 3e-8
    l64 = l.double().requires_grad_()
    xs = x.double() * l64.view(-1) if feedforward else x.double()
    y64 = F.linear(xs, W.double(), b.double()) * (1 if feedforward else l64.view(-1))
    (want,) = torch.autograd.grad(y64, l64, dy.double())
    for backend in BACKENDS:
        leaf = l.clone().requires_grad_()
        (got,) = torch.autograd.grad(ia3_linear(x, W, b, leaf, feedforward=feedforward, backend=backend), leaf, dy)
        assert got.view(-1)[3].double().item() == pytest.approx(want.view(-1)[3].item(), rel=2e-3), backend
