"""Regression tests for the defects of issue 12, each as the issue reported it, checked against fp64."""
from __future__ import annotations

import pytest
import torch

from fastft.ops.attention import flash_attention
from fastft.ops.dora import dora_row_norm
from fastft.ops.lora import lora_linear
from fastft.ops.qlora import nf4_linear, qlora_linear
from fastft.quant.nf4_weight import quantize_nf4
from tests.fuzz import references as ref
from tests.utils import INTERPRET, interpreter_only

F32 = torch.float32

# ----------------------------------------------------------------------------------------------
# 1. A strided or stride-0 bias was read as if contiguous by the Triton GEMMs.


def _biases(n):
    return {"strided": torch.randn(2 * n)[::2], "expanded": torch.tensor([0.5]).expand(n),
            "strided-bf16": torch.randn(3 * n, dtype=torch.bfloat16)[1::3]}


def _check_linear(op, y, x, W, b, A, B, s, n_round=8, weight_mag=None):
    dy = torch.ones_like(y)
    y64, _, ymag, _ = ref.linear_with_grads(x, W, b, A, B, s, dy, grad_w=False, weight_mag=weight_mag)
    ref.check(op, "regression y", y, y64, ymag, x.dtype, n_round, (x.shape[-1], 16))


@interpreter_only
@pytest.mark.parametrize("kind", ["strided", "expanded", "strided-bf16"])
def test_lora_linear_strided_bias(kind):
    torch.manual_seed(0)
    x, W, A, B = torch.randn(4, 64), torch.randn(8, 64), torch.randn(2, 64), torch.randn(8, 2)
    b = _biases(8)[kind]
    assert b.stride(0) != 1
    _check_linear("lora_linear", lora_linear(x, W, b, A, B, 1.0, backend="triton"), x, W, b, A, B, 1.0)


@interpreter_only
@pytest.mark.parametrize("kind", ["strided", "expanded"])
@pytest.mark.parametrize("op", ["qlora_linear", "nf4_linear"])
def test_nf4_ops_strided_bias(op, kind):
    torch.manual_seed(0)
    x, A, B = torch.randn(5, 64), torch.randn(2, 64), torch.randn(40, 2)
    qw = quantize_nf4(torch.randn(40, 64), blocksize=64)
    b = _biases(40)[kind]
    W, W_mag = ref.nf4_dequantize_f64(qw)
    if op == "qlora_linear":
        y = qlora_linear(x, qw, b, A, B, 0.5, backend="triton")
        _check_linear(op, y, x, W, b, A, B, 0.5, n_round=9, weight_mag=W_mag)
    else:
        _check_linear(op, nf4_linear(x, qw, b, backend="triton"), x, W, b, None, None, 0.0, n_round=3,
                      weight_mag=W_mag)


# ----------------------------------------------------------------------------------------------
# 2. Windows near 2**31 overflowed the kernels' int32 band bounds (all-zero output at 2**31 - 1).

WINDOWS = [2**31 - 1, 2**31 - 2, 2**31, 2**31 + 1, 2**62]


def _attention_check(args, kw, what):
    o = flash_attention(**args, **kw, backend="triton")
    do = torch.randn_like(o)
    names = [n for n in ("q", "k", "v") if args[n].requires_grad]
    grads = torch.autograd.grad(o, [args[n] for n in names], do)
    o64, omag, g64, gmag, smag = ref.attention_with_grads(args["q"], args["k"], args["v"], do,
                                                          cu_seqlens=kw.get("cu_seqlens"), causal=kw["causal"],
                                                          window=kw["window"])
    D = args["q"].shape[-1]
    shift = ref.softmax_shift(smag.max().item(), D)
    ref.check("flash_attention", f"regression {what} o", o, o64, omag, F32, 3, (D, 64), shift)
    for n, g in zip(names, grads):
        ref.check("flash_attention", f"regression {what} d{n}", g, g64[n], gmag[n], F32, 4, (D, 64), shift)


@interpreter_only
@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("causal", [False, True])
def test_attention_huge_window_dense(window, causal):
    torch.manual_seed(0)
    args = {n: torch.randn(1, 37, 2, 16, requires_grad=True) for n in ("q", "k", "v")}
    _attention_check(args, dict(causal=causal, window=window), f"dense window={window}")


@interpreter_only
@pytest.mark.parametrize("window", WINDOWS)
def test_attention_huge_window_varlen(window):
    torch.manual_seed(0)
    args = {n: torch.randn(40, 2, 16, requires_grad=True) for n in ("q", "k", "v")}
    cu = torch.tensor([0, 5, 5, 40], dtype=torch.int32)
    _attention_check(args, dict(causal=False, window=window, cu_seqlens=cu, max_seqlen=35), f"varlen window={window}")


@interpreter_only
@pytest.mark.parametrize("bound", [2**31 - 2, 2**31 - 1])
def test_attention_kernel_band_is_overflow_safe(bound):
    """The kernels themselves, given int32 bounds near the limit (the op clamps them, other callers may not)."""
    from fastft.kernels.attention_bwd import attention_backward
    from fastft.kernels.attention_fwd import attention_forward

    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 37, 2, 16) for _ in range(3))
    do = torch.randn_like(q)
    o, lse = attention_forward(q, k, v, sm_scale=0.25, left=bound, right=bound)
    dq, dk, dv, _, _ = attention_backward(do, q, k, v, o, lse, sm_scale=0.25, left=bound, right=bound)
    o64, omag, g64, gmag, smag = ref.attention_with_grads(q, k, v, do, scale=0.25)
    shift = ref.softmax_shift(smag.max().item(), 16)
    ref.check("flash_attention", "kernel band o", o, o64, omag, F32, 3, (16, 37), shift)
    for n, g in (("q", dq), ("k", dk), ("v", dv)):
        ref.check("flash_attention", f"kernel band d{n}", g, g64[n], gmag[n], F32, 4, (16, 37), shift)


def test_attention_max_seqlen_cheap_check():
    q = torch.randn(40, 2, 16)
    cu = torch.tensor([0, 5, 5, 40], dtype=torch.int32)  # longest document: 35 tokens
    for backend in ("torch",) + (("triton",) if INTERPRET else ()):
        with pytest.raises(ValueError, match="max_seqlen"):  # 3 documents of <= 10 tokens cannot hold 40
            flash_attention(q, q, q, cu_seqlens=cu, max_seqlen=10, backend=backend)


@interpreter_only
def test_attention_max_seqlen_debug_check(monkeypatch):
    q = torch.randn(40, 2, 16)
    cu = torch.tensor([0, 5, 5, 40], dtype=torch.int32)
    flash_attention(q, q, q, cu_seqlens=cu, max_seqlen=20, backend="triton")  # the caller's contract, unchecked
    monkeypatch.setenv("FASTFT_DEBUG", "1")
    with pytest.raises(ValueError, match="longest document"):  # 3 × 20 >= 40 passes the cheap check
        flash_attention(q, q, q, cu_seqlens=cu, max_seqlen=20, backend="triton")


# ----------------------------------------------------------------------------------------------
# 3. lora_linear with empty dimensions crashed in backward on the Triton path.

@interpreter_only
@pytest.mark.parametrize("M,K,N,r", [(4, 8, 0, 2), (4, 0, 6, 2), (0, 8, 6, 2), (0, 0, 0, 1), (3, 8, 6, 1),
                                     (3, 8, 6, 33), (1, 1, 1, 17)])
def test_lora_linear_empty_dims(M, K, N, r):
    torch.manual_seed(0)
    x = torch.randn(M, K, requires_grad=True)
    W = torch.randn(N, K, requires_grad=True)
    b, A, B = (torch.randn(*s, requires_grad=True) for s in ((N,), (r, K), (N, r)))
    y = lora_linear(x, W, b, A, B, 0.5, backend="triton")
    assert y.shape == (M, N)
    dy = torch.randn(M, N)
    grads = torch.autograd.grad(y, [x, W, b, A, B], dy, allow_unused=True)
    y64, g64, ymag, gmag = ref.linear_with_grads(x, W, b, A, B, 0.5, dy)
    ref.check("lora_linear", "empty y", y, y64, ymag, F32, 8, (K, r))
    for name, g in zip(("x", "weight", "bias", "lora_A", "lora_B"), grads):
        ref.check("lora_linear", f"empty d{name}", g, g64[name], gmag[name], F32, 8, (M, N, K, r))


# ----------------------------------------------------------------------------------------------
# 4. `fastft train --quantize nf4` counted each NF4 weight twice (through NF4Linear and peft's wrapper).

def test_parameter_counts_quantized_lora_llama():
    from peft import LoraConfig

    import fastft
    from fastft.integration.parameter_count import parameter_counts
    from tests.utils import ALL_LINEAR, tiny_llama

    model = tiny_llama(tie_word_embeddings=False)
    dense_total = sum(p.numel() for p in model.parameters())
    targets = [m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and name != "lm_head"]
    r = 4
    lora = sum(r * (m.in_features + m.out_features) for m in targets)
    fastft.quantize_model(model, "nf4")
    model = fastft.get_peft_model(model, LoraConfig(r=r, lora_alpha=8, target_modules=ALL_LINEAR))
    assert parameter_counts(model) == (lora, dense_total + lora)


@interpreter_only
@pytest.mark.parametrize("nf4", [False, True])
def test_dora_row_norm_strided_lora_B(nf4):
    """Found by fuzzing NF4-based DoRA: with r a power of two ≥ 16 the padded lora_B came back as the strided view
    itself and the Triton row-norm kernel read it with unit strides (norm 32.37 instead of 27.58, y off by 15%)."""
    g = torch.Generator().manual_seed(0)
    W = torch.randn(3, 64, generator=g)
    W = quantize_nf4(W, blocksize=64, double_quant=False) if nf4 else W
    A, B = torch.randn(16, 64, generator=g), torch.randn(3, 32, generator=g)[:, ::2]
    got = dora_row_norm(W, A, B, 1.0, dtype=torch.float32, backend="triton")
    dense = W.dequantize(torch.float32) if nf4 else W
    want = torch.linalg.norm(dense.double() + B.double() @ A.double(), dim=1)
    assert torch.allclose(got.double(), want, rtol=1e-5), (got, want)
