"""Property-based fuzzing of the PEFT method ops — dora_linear, ia3_linear, bottleneck_adapter — on both backends
against fp64 references written from the math (references.dora_math, grads_and_mags, bottleneck_with_grads)."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fastft.ops.bottleneck_adapter import ACTIVATIONS, bottleneck_adapter
from fastft.ops.dora import dora_linear
from fastft.ops.ia3 import ia3_linear
from fastft.quant.nf4_weight import quantize_nf4
from tests.fuzz import references as ref
from tests.fuzz.checks import check_example, grads_of, needing_grad
from tests.fuzz.strategies import LAYOUTS, dim, float_dtypes, fuzz, tensor
from tests.utils import interpreter_only

BACKENDS = ["torch", pytest.param("triton", marks=interpreter_only)]
SCALINGS = (1.0, 0.5, -2.0, 1 / 33)


def _lead(data):
    return data.draw(st.sampled_from([(), (2,), (1, 3)]), label="leading dims")


# ----------------------------------------------------------------------------------------------
# dora_linear (dense frozen W; dropout 0, the fused path's domain — dropout > 0 is the torch reference with
# torch's own mask)
# Roundings, torch path (the longer): the A/B casts, x·Aᵀ, (x·Aᵀ)·Bᵀ, x·Wᵀ, s·lora, the sum, σ·z in the promoted
# dtype and its cast, + b: 9; backward the same chain plus dm's division: 10. σ's own error (the row norm,
# summed directly) is `dora_row_norm_error`'s relative bound, carried as an absolute extra. The fused path's dm is
# Σ dy⊙(y − b)/m: y's rounding includes |b|, so dm's magnitude counts Σ|dy|·|b|/|m| too.
DORA_N_ROUND = 10


@pytest.mark.parametrize("backend", BACKENDS)
@fuzz(10)
@given(data=st.data())
def test_dora_linear(data, backend):
    _dora_case(data, backend, nf4=False)


# NF4 bases: W is quantized (blocksize 64, K a multiple of it on the fused path, ragged K on the reference path); the
# reference is the fp64 value of the stored fields, |W| replaced by the dequantization's magnitude, and the op's
# rounding of W to the compute dtype (one rounding, plus three fp32 ones inside the dequantization: each at most
# u of any dtype) adds 4 to the count and joins the row norm's bound.
@pytest.mark.parametrize("backend", BACKENDS)
@fuzz(6)
@given(data=st.data())
def test_dora_linear_nf4_weight(data, backend):
    _dora_case(data, backend, nf4=True)


def _dora_case(data, backend, nf4):
    op = "dora_linear" if not nf4 else "dora_linear nf4"
    dtype = data.draw(float_dtypes(), label="dtype")
    adapter_dtype = data.draw(st.sampled_from([dtype, torch.float32]), label="adapter dtype")
    lead = _lead(data)
    M, K, N, r = dim(data, 1, 24, label="rows"), dim(data, 1, 48, label="K"), dim(data, 1, 48, label="N"), \
        dim(data, 1, 17, label="r")
    if nf4:
        K = data.draw(st.sampled_from([64, 128, 70]), label="nf4 K")
    g = dict(requires_grad=True)
    x = tensor(data, lead + (M, K), dtype, label="x", **g)
    W = tensor(data, (N, K), dtype, label="weight")
    W_mag = None
    if nf4:
        W = quantize_nf4(W, blocksize=64, double_quant=data.draw(st.booleans(), label="double quant"))
    b = tensor(data, (N,), dtype, label="bias", **g) if data.draw(st.booleans(), label="bias") else None
    A = tensor(data, (r, K), adapter_dtype, label="lora_A", **g)
    B = tensor(data, (N, r), adapter_dtype, label="lora_B", **g)
    m = tensor(data, (N,), adapter_dtype, label="magnitude", **g)
    s = data.draw(st.sampled_from(SCALINGS), label="scaling")
    dy = tensor(data, lead + (M, N), dtype, label="dy")
    y = dora_linear(x, W, b, A, B, m, s, backend=backend)
    inputs = needing_grad((("x", x), ("bias", b), ("lora_A", A), ("lora_B", B), ("magnitude", m)))
    grads = grads_of(y, inputs, dy)

    if nf4:
        W, W_mag = ref.nf4_dequantize_f64(W)
    norm, sig_rel = ref.dora_row_norm_error(W, A, B, s, dtype, weight_mag=W_mag)
    vals = dict(x=x, weight=W, bias=b, lora_A=A, lora_B=B, magnitude=m, scaling=float(s), row_norm=norm)
    y64, g64, ymag, gmags = ref.grads_and_mags(
        ref.dora_math, vals, dy, None if W_mag is None else {**_abs_f64(vals), "weight": W_mag})
    # σ's relative error, pushed through the same multilinear function (a column scale of |y| and |dy|)
    absvals = {**_abs_f64(vals), "scaling": abs(float(s)), "bias": None}
    if W_mag is not None:
        absvals["weight"] = W_mag
    absvals["magnitude"] = absvals["magnitude"] * sig_rel
    y_extra, g_extra = ref.grads_and_mags(ref.dora_math, absvals, ref.f64(dy).abs(), absvals)[2:]
    y_extra = y_extra.abs()
    g_extra = {n: t.abs() for n, t in g_extra.items()}
    g_extra["magnitude"] = gmags["magnitude"] * sig_rel
    if b is not None:
        dyA = ref.f64(dy).abs().reshape(-1, N)
        gmags["magnitude"] = gmags["magnitude"] + (dyA * (ref.f64(b).abs() / ref.f64(m).abs())).sum(0)
    T = M * (1 if not lead else int(torch.tensor(lead).prod()))
    lengths = {"y": (K, r), "x": (N, r), "bias": (T,), "lora_A": (N, T), "lora_B": (K, T), "magnitude": (T,)}
    check_example(op, backend, inputs, grads, y, y64, ymag, g64, gmags, dtype, DORA_N_ROUND + (4 if nf4 else 0),
                  lengths, y_floor=y_extra, floors=g_extra)


def _abs_f64(vals):
    return {k: (ref.f64(v).abs() if isinstance(v, torch.Tensor) else (abs(v) if isinstance(v, float) else v))
            for k, v in vals.items()}


# ----------------------------------------------------------------------------------------------
# ia3_linear: peft's shapes, l (1, K) feed-forward or (N, 1) otherwise; any view
# Roundings: x⊙l (or x·Wᵀ + b), the GEMM, ⊙l, the output cast: 4; backward dy⊙l / dy·W, ⊙l, dl's division by l
# of a rounded value: 5.
IA3_N_ROUND = 5


def _ia3_math(x, weight, bias, l, feedforward):
    if feedforward:
        return (x * l.reshape(-1)) @ weight.t() + (0 if bias is None else bias)
    return (x @ weight.t() + (0 if bias is None else bias)) * l.reshape(-1)


@pytest.mark.parametrize("backend", BACKENDS)
@fuzz(10)
@given(data=st.data())
def test_ia3_linear(data, backend):
    op = "ia3_linear"
    dtype = data.draw(float_dtypes(), label="dtype")
    ff = data.draw(st.booleans(), label="feedforward")
    lead = _lead(data)
    M, K, N = dim(data, 1, 24, label="rows"), dim(data, 1, 48, label="K"), dim(data, 1, 48, label="N")
    x = tensor(data, lead + (M, K), dtype, label="x", requires_grad=True)
    W = tensor(data, (N, K), dtype, label="weight")
    b = tensor(data, (N,), dtype, label="bias", requires_grad=True) if data.draw(st.booleans(), label="bias") \
        else None
    l_dtype = data.draw(st.sampled_from([dtype, torch.float32]), label="ia3_l dtype")
    l = tensor(data, (1, K) if ff else (N, 1), l_dtype, label="ia3_l", requires_grad=True)
    dy = tensor(data, lead + (M, N), dtype, label="dy")
    y = ia3_linear(x, W, b, l, feedforward=ff, backend=backend)
    inputs = needing_grad((("x", x), ("bias", b), ("ia3_l", l)))
    grads = grads_of(y, inputs, dy)
    vals = {"x": x, "weight": W, "bias": b, "l": l, "feedforward": ff}
    y64, g64, ymag, gmags = ref.grads_and_mags(_ia3_math, vals, dy)
    g64["ia3_l"], gmags["ia3_l"] = g64.pop("l"), gmags.pop("l")
    T = M * (1 if not lead else int(torch.tensor(lead).prod()))
    lengths = {"y": (K,), "x": (N,), "bias": (T,), "ia3_l": (T, N)}
    check_example(op, backend, inputs, grads, y, y64, ymag, g64, gmags, dtype, IA3_N_ROUND, lengths)


# ----------------------------------------------------------------------------------------------
# bottleneck_adapter
# Roundings: the D/U/bias casts to h's dtype, h·Dᵀ, + b_d, act, z·Uᵀ, + b_u, h + …: 8 (forward and backward).
BOTTLENECK_N_ROUND = 8
# up_bias takes every layout (the Triton path read a strided or stride-0 up_bias wrongly until kernels/shared.py
# `unit_stride`; test_bottleneck_adapter_strided_up_bias keeps that case).
UP_BIAS_LAYOUTS = LAYOUTS


def _bottleneck_case(data, backend, up_bias_layouts=UP_BIAS_LAYOUTS, force_up_bias=False):
    op = "bottleneck_adapter"
    dtype = data.draw(float_dtypes(), label="dtype")
    wdtype = data.draw(st.sampled_from([dtype, torch.float32]), label="adapter dtype")
    act = data.draw(st.sampled_from(ACTIVATIONS), label="activation")
    lead = _lead(data)
    M, N, r = dim(data, 1, 24, label="rows"), dim(data, 2 if force_up_bias else 1, 48, label="N"), dim(data, 1, 33, label="r")
    g = dict(requires_grad=True)
    h = tensor(data, lead + (M, N), dtype, label="h", **g)
    D = tensor(data, (r, N), wdtype, label="down_weight", scale=0.3, **g)
    U = tensor(data, (N, r), wdtype, label="up_weight", **g)
    bd = tensor(data, (r,), wdtype, label="down_bias", **g) if data.draw(st.booleans(), label="down bias") else None
    bu = tensor(data, (N,), wdtype, label="up_bias", layouts=up_bias_layouts, **g) \
        if force_up_bias or data.draw(st.booleans(), label="up bias") else None
    dy = tensor(data, lead + (M, N), dtype, label="dy")
    y = bottleneck_adapter(h, D, bd, U, bu, act, backend=backend)
    inputs = needing_grad((("h", h), ("D", D), ("bd", bd), ("U", U), ("bu", bu)))
    grads = grads_of(y, inputs, dy)
    u32 = ref.UNIT_ROUNDOFF[torch.float32]
    pre_rel = BOTTLENECK_N_ROUND * ref.UNIT_ROUNDOFF[dtype] + ref.LAMBDA * u32 * N**0.5
    y64, g64, ymag, mags = ref.bottleneck_with_grads(h, D, bd, U, bu, act, dy, pre_rel)
    T = M * (1 if not lead else int(torch.tensor(lead).prod()))
    lengths = {"y": (N, r), "h": (N, r), "D": (T, N), "bd": (T, N), "U": (T,), "bu": (T,)}
    check_example(op, backend, inputs, grads, y, y64, ymag, g64, {n: m[0] for n, m in mags.items()}, dtype,
                  BOTTLENECK_N_ROUND, lengths, floors={n: m[1] for n, m in mags.items()})


@pytest.mark.parametrize("backend", BACKENDS)
@fuzz(10)
@given(data=st.data())
def test_bottleneck_adapter(data, backend):
    _bottleneck_case(data, backend)


@interpreter_only
@fuzz(3)
@given(data=st.data())
def test_bottleneck_adapter_strided_up_bias(data):
    _bottleneck_case(data, "triton", up_bias_layouts=("last_strided", "expanded"), force_up_bias=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dora_linear_cancelling_row_norm(backend):
    """Found by FASTFT_FUZZ_PROFILE=dev: W + s·B·A nearly cancels in a row (‖W'‖ = 0.0037 against ‖W‖ ≈ 1). The old
    row norm, the expansion ‖W‖² + 2s·ΣB∘(W·Aᵀ) + s²·B(A·Aᵀ)Bᵀ with W·Aᵀ rounded to fp16, came out 0: σ = m/0 and y
    were inf on both backends (peft's direct norm gives y = 1.696). The norm is now summed directly."""
    def r(shape, seed, dt):
        return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dt)

    x, W = r((1, 1), 0, torch.float16), r((15, 1), 17, torch.float16)
    A, B, m = r((1, 1), 553, torch.float32), r((15, 1), 391, torch.float32), r((15,), 0, torch.float32)
    s = -2.0
    y = dora_linear(x, W, None, A, B, m, s, backend=backend)
    norm, sig_rel = ref.dora_row_norm_error(W, A, B, s, torch.float16)
    vals = dict(x=x, weight=W, bias=None, lora_A=A, lora_B=B, magnitude=m, scaling=s, row_norm=norm)
    y64, _, ymag, _ = ref.grads_and_mags(ref.dora_math, vals, torch.ones(1, 15))
    ref.check("dora_linear", f"{backend} y (cancelling row)", y, y64, ymag, torch.float16, DORA_N_ROUND, (1, 1),
              abs_floor=sig_rel * ymag)
