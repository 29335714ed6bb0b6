"""Property-based fuzzing of the layer ops — rms_norm, rope / rope_, swiglu, geglu — on both backends against the
fp64 references in references.py (forward and every gradient, views of every tensor, sizes 1 and odd)."""
from __future__ import annotations


import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fastft.ops.glu import geglu, swiglu
from fastft.ops.rms_norm import rms_norm
from fastft.ops.rope import rope, rope_
from tests.fuzz import references as ref
from tests.fuzz.checks import grads_of
from tests.fuzz.strategies import LAYOUTS, dim, float_dtypes, fuzz, tensor
from tests.utils import interpreter_only

U32 = ref.UNIT_ROUNDOFF[torch.float32]
BACKENDS = ["torch", pytest.param("triton", marks=interpreter_only)]

# ----------------------------------------------------------------------------------------------
# rms_norm
# Roundings on the longest path (torch backend, cast="input"): x̂ → dtype, w + offset in w's dtype (its mag is
# |w| + |offset|), the product: 3; backward through autograd of the same: dy·w, the sum for dw, dx → dtype and
# dh + dx with a residual: 4. The fp32 mean of squares is a length-N reduction; rsqrt and the few fp32 products
# around it add `RMS_EXTRA` relative.
RMS_N_ROUND = 4
RMS_EXTRA = 8 * U32
# The weight takes every layout (a strided or stride-0 weight was read wrongly by the Triton kernels until
# kernels/shared.py `unit_stride`; test_rms_norm_strided_weight keeps that case).
RMS_WEIGHT_LAYOUTS = LAYOUTS


def draw_rms_problem(data, max_rows=24, max_n=64, weight_layouts=RMS_WEIGHT_LAYOUTS, min_n=1):
    """A random rms_norm call: (args, dy, dh) — dh, the residual stream's upstream gradient, only with a residual."""
    dtype = data.draw(float_dtypes(), label="dtype")
    offset = data.draw(st.sampled_from([0.0, 1.0]), label="offset")
    cast = data.draw(st.sampled_from([None, "input", "fp32"]), label="cast")
    eff_cast = cast or ("input" if offset == 0.0 else "fp32")
    w_dtype = data.draw(st.sampled_from([dtype, torch.float32]), label="weight dtype") if eff_cast == "input" else dtype
    lead = data.draw(st.sampled_from([(), (2,), (1, 3)]), label="leading dims")
    M, N = dim(data, 1, max_rows, label="rows"), dim(data, min_n, max_n, label="N")
    eps = data.draw(st.sampled_from([1e-6, 1e-5, 0.5]), label="eps")
    x = tensor(data, lead + (M, N), dtype, label="x", requires_grad=True)
    w = tensor(data, (N,), w_dtype, label="weight", requires_grad=True, scale=0.5, layouts=weight_layouts)
    residual = None
    if data.draw(st.booleans(), label="residual"):
        residual = tensor(data, lead + (M, N), dtype, label="residual", requires_grad=True)
    dy = tensor(data, lead + (M, N), dtype, label="dy")
    dh = tensor(data, lead + (M, N), dtype, label="dh") if residual is not None and data.draw(
        st.booleans(), label="dh given") else None
    return dict(x=x, weight=w, eps=eps, offset=offset, cast=cast, residual=residual), dy, dh


def _check_rms(args, dy, dh, backend):
    op = "rms_norm"
    x, w, res = args["x"], args["weight"], args["residual"]
    out = rms_norm(x, w, args["eps"], offset=args["offset"], residual=res, cast=args["cast"], backend=backend)
    dtype, N = x.dtype, x.shape[-1]
    inputs = {"x": x, "weight": w} | ({"residual": res} if res is not None else {})
    if res is None:
        y, outs, grads_out = out, [out], [dy]
        h = x
    else:
        y, h_out = out
        # The residual stream h = x + residual is an output in x's dtype: one rounding of the exact sum.
        ref.check(op, f"{backend} h", h_out, ref.f64(x) + ref.f64(res), ref.f64(x).abs() + ref.f64(res).abs(),
                  dtype, 1, ())
        h = h_out  # y normalizes the rounded h (the rule: compare against a reference rounding the same values)
        outs, grads_out = [y, h_out], [dy] + ([dh] if dh is not None else [])
        outs = outs[:len(grads_out)]
    grads = grads_of(outs, inputs, grads_out)
    y64, dh64, dw64, mags = ref.rms_norm_with_grads(h.reshape(-1, N), w, args["eps"], args["offset"],
                                                    dy.reshape(-1, N), None if dh is None else dh.reshape(-1, N))
    ref.check(op, f"{backend} y", y.reshape(-1, N), y64, mags["y"], dtype, RMS_N_ROUND, (N,), extra_rel=RMS_EXTRA)
    for name in ("x", "residual"):
        if name in grads:
            ref.check(op, f"{backend} d{name}", grads[name].reshape(-1, N), dh64, mags["x"], dtype, RMS_N_ROUND,
                      (N, N), extra_rel=RMS_EXTRA)
    ref.check(op, f"{backend} dweight", grads["weight"], dw64, mags["weight"], dtype, RMS_N_ROUND,
              (h.numel() // max(N, 1),), extra_rel=RMS_EXTRA)
    assert grads["weight"].dtype == w.dtype and grads["x"].dtype == x.dtype
    ref.count_example(f"{op}[{backend}]")


@pytest.mark.parametrize("backend", BACKENDS)
@fuzz(12)
@given(data=st.data())
def test_rms_norm(data, backend):
    args, dy, dh = draw_rms_problem(data)
    _check_rms(args, dy, dh, backend)


@interpreter_only
@fuzz(3)
@given(data=st.data())
def test_rms_norm_strided_weight(data):
    # min_n=2: a one-element weight has no stride to ignore
    args, dy, dh = draw_rms_problem(data, weight_layouts=("last_strided", "expanded"), min_n=2)
    _check_rms(args, dy, dh, "triton")


# ----------------------------------------------------------------------------------------------
# rope / rope_
# Roundings: the torch backend rounds q·cos, rotate_half(q)·sin and their sum (3; Triton rounds once); backward
# likewise 3. cos/sin are inputs in q's dtype, exact there.
ROPE_N_ROUND = 3


def _cos_sin(data, Bc, S, D, dtype):
    angles = tensor(data, (Bc, S, D // 2), torch.float64, label="angles", scale=3.0)
    angles = torch.cat([angles, angles], dim=-1)  # transformers' layout: both halves share one frequency
    return angles.cos().to(dtype), angles.sin().to(dtype)


def draw_rope_problem(data, plain=False):
    """A random rope call: (q, k, cos, sin, unsqueeze_dim, dq_out, dk_out); plain: contiguous q and k (rope_)."""
    dtype = data.draw(float_dtypes(), label="dtype")
    B, S = dim(data, 1, 3, label="B"), dim(data, 1, 17, label="S")
    HQ, HK = dim(data, 1, 5, label="HQ"), dim(data, 1, 3, label="HK")
    D = 2 * dim(data, 1, 17, label="D/2")
    unsq = data.draw(st.sampled_from([1, 2]), label="unsqueeze_dim")
    shape = (lambda H: (B, H, S, D)) if unsq == 1 else (lambda H: (B, S, H, D))
    lay = {"layouts": ("contiguous",)} if plain else {}
    q = tensor(data, shape(HQ), dtype, label="q", requires_grad=True, **lay)
    k = tensor(data, shape(HK), dtype, label="k", requires_grad=True, **lay)
    cos, sin = _cos_sin(data, data.draw(st.sampled_from([1, B]), label="cos batch"), S, D, dtype)
    do_q = tensor(data, q.shape, dtype, label="dq_out")
    do_k = tensor(data, k.shape, dtype, label="dk_out")
    return q, k, cos, sin, unsq, do_q, do_k


def _check_rope(op, backend, q, k, outs, grads, cos, sin, unsq, do_q, do_k):
    D = q.shape[-1]
    for name, t, o, g, do in (("q", q, outs[0], grads[0], do_q), ("k", k, outs[1], grads[1], do_k)):
        c, s = cos.unsqueeze(unsq).expand(t.shape), sin.unsqueeze(unsq).expand(t.shape)
        o64, d64, omag, dmag = ref.rope_with_grads(t, c, s, do)
        ref.check(op, f"{backend} {name}_out", o, o64, omag, t.dtype, ROPE_N_ROUND, (), extra_rel=4 * U32)
        ref.check(op, f"{backend} d{name}", g, d64, dmag, t.dtype, ROPE_N_ROUND, (), extra_rel=4 * U32)
        assert o.dtype == t.dtype and o.shape == t.shape, (D, o.shape)
    ref.count_example(f"{op}[{backend}]")


@pytest.mark.parametrize("backend", BACKENDS)
@fuzz(12)
@given(data=st.data())
def test_rope(data, backend):
    """Out of place; q and k with different head counts, in transposed / sliced / expanded views."""
    q, k, cos, sin, unsq, do_q, do_k = draw_rope_problem(data)
    qo, ko = rope(q, k, cos, sin, unsqueeze_dim=unsq, backend=backend)
    grads = torch.autograd.grad([qo, ko], [q, k], [do_q, do_k])
    _check_rope("rope", backend, q, k, (qo, ko), grads, cos, sin, unsq, do_q, do_k)


@pytest.mark.parametrize("backend", BACKENDS)
@fuzz(8)
@given(data=st.data())
def test_rope_inplace(data, backend):
    """rope_ on plain (non-view) tensors: rotated in place (the same tensors come back), gradients through the
    in-place Function to the leaves before it."""
    q0, k0, cos, sin, unsq, do_q, do_k = draw_rope_problem(data, plain=True)
    q, k = q0 * 1, k0 * 1  # non-leaf, non-view tensors that autograd lets us mutate
    qo, ko = rope_(q, k, cos, sin, unsqueeze_dim=unsq, backend=backend)
    assert qo is q and ko is k, "rope_ must return q and k themselves"
    grads = torch.autograd.grad([qo, ko], [q0, k0], [do_q, do_k])
    _check_rope("rope_", backend, q0, k0, (qo, ko), grads, cos, sin, unsq, do_q, do_k)


# ----------------------------------------------------------------------------------------------
# swiglu / geglu
# Roundings: torch rounds act(gate) and the product (2); backward act'(gate) (computed in fp32 by torch and
# Triton, rounded on the torch path), dy·up, dy·act, the products: 3. The activations' own fp32 evaluation
# (exp / sigmoid, tanh = 2σ(2u) − 1) adds a few u32 of the magnitude: GLU_EXTRA.
GLU_N_ROUND = 3
GLU_EXTRA = 16 * U32


def draw_glu_problem(data):
    """A random swiglu / geglu call: (gate, up, dy)."""
    dtype = data.draw(float_dtypes(), label="dtype")
    lead = data.draw(st.sampled_from([(), (2,), (1, 3)]), label="leading dims")
    shape = lead + (dim(data, 1, 24, label="rows"), dim(data, 1, 64, label="N"))
    scale = data.draw(st.sampled_from([1.0, 4.0]), label="gate scale")
    gate = tensor(data, shape, dtype, label="gate", requires_grad=True, scale=scale)
    up = tensor(data, shape, dtype, label="up", requires_grad=True)
    dy = tensor(data, shape, dtype, label="dy")
    return gate, up, dy


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gelu", [False, True], ids=["swiglu", "geglu"])
@fuzz(10)
@given(data=st.data())
def test_glu(data, gelu, backend):
    op = "geglu" if gelu else "swiglu"
    gate, up, dy = draw_glu_problem(data)
    dtype = gate.dtype
    y = (geglu if gelu else swiglu)(gate, up, backend=backend)
    dg, du = torch.autograd.grad(y, [gate, up], dy)
    y64, dg64, du64, mags = ref.glu_with_grads(gate, up, dy, gelu)
    ref.check(op, f"{backend} y", y, y64, mags["y"], dtype, GLU_N_ROUND, (), extra_rel=GLU_EXTRA)
    ref.check(op, f"{backend} dgate", dg, dg64, mags["gate"], dtype, GLU_N_ROUND, (), extra_rel=GLU_EXTRA)
    ref.check(op, f"{backend} dup", du, du64, mags["up"], dtype, GLU_N_ROUND, (), extra_rel=GLU_EXTRA)
    assert y.dtype == dg.dtype == du.dtype == dtype
    ref.count_example(f"{op}[{backend}]")
