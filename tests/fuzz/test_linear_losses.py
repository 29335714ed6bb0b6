"""Property-based fuzzing of the fused linear losses — linear_cross_entropy, linear_kl_div, linear_distill_loss,
linear_sequence_logprobs — on both backends against fp64 losses written from the math (references.ce_rows,
kl_rows, head_grads): every option, small chunk sizes (T spans several chunks), views, sizes 1 and odd."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fastft.ops.linear_losses import linear_cross_entropy, linear_distill_loss, linear_kl_div, linear_sequence_logprobs
from tests.fuzz import references as ref
from tests.fuzz.checks import check_grads, draw_ce_options, grads_of, needing_grad
from tests.fuzz.strategies import dim, float_dtypes, fuzz, tensor
from tests.utils import interpreter_only

BACKENDS = ["torch", pytest.param("triton", marks=interpreter_only)]
# Logits: the GEMM's output and the bias add, each rounded to the compute dtype: 2 (the rest of the loss is fp32,
# covered by the row terms in references.ce_rows / kl_rows).
LOGIT_N_ROUND = 2
# Gradients: dloss/dz rounded into the chunk buffer, the dh GEMM's output, the fp16 path's deferred 1/N, the
# grad_output product, the final cast of the fp32 dW / db accumulators: 5. dW and db sum over all T rows in fp32.
GRAD_N_ROUND = 5
CHUNKS = (None, 1, 2, 3, 5)
SCALAR_GRADS = (1.0, 0.5, -3.0)
# The losses are fp32 results: nothing is finer than fp32's subnormal spacing (keeps 0/0 out of exact zeros).
FP32_TINY = ref.SUBNORMAL[torch.float32]


def _labels(data, shape, V, ignore_index):
    frac = data.draw(st.sampled_from([0.0, 0.3, 1.0]), label="ignored fraction")
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**32 - 1), label="labels seed"))
    labels = torch.randint(0, V, shape, generator=gen)
    return torch.where(torch.rand(shape, generator=gen) < frac, ignore_index, labels)


def _row_weights(data, reduction, loss_shape, dtype, valid_count, num_items):
    """(grad_output to pass, fp64 d(total)/d(row loss) per row, the reduction's denominator)."""
    if reduction == "none":
        g = tensor(data, loss_shape, torch.float32, label="grad_output")
        return g, ref.f64(g).reshape(-1), 1.0
    g = data.draw(st.sampled_from(SCALAR_GRADS), label="grad_output")
    n = int(torch.tensor(loss_shape).prod()) if loss_shape else 1
    if reduction == "sum":
        den = 1.0
    elif num_items is not None:
        den = float(num_items)
    else:
        den = float(max(valid_count, 1))
    return torch.tensor(g), torch.full((n,), g / den, dtype=torch.float64), den


def _check_reduced(op, what, out, reduction, loss_rows, loss_err, den, dtype, g_scalar=None):
    if reduction == "none":
        ref.check(op, what, out.reshape(-1), loss_rows, loss_rows.abs(), dtype, 0, (), abs_floor=loss_err + FP32_TINY)
    else:
        ref.check(op, what, out.reshape(()), loss_rows.sum() / den, loss_rows.abs().sum() / den, dtype, 0,
                  (loss_rows.numel(),), abs_floor=float(loss_err.sum()) / den + FP32_TINY)


def _check_head_grads(op, backend, inputs, grads, h, W, w_rows, dz_terms, dtype):
    """The gradients of a loss over logits z = h·Wᵀ (+ b), h [T, H], from dloss/dz's (value, magnitude, error) per
    row (references.head_grads); then the example is counted."""
    T, V = h.shape[0], W.shape[0]
    check_grads(op, backend, inputs, grads, ref.head_grads(h, W, w_rows, *dz_terms), dtype, GRAD_N_ROUND,
                {"x": (V,), "weight": (T,), "bias": (T,)}, reshape=True)
    ref.count_example(f"{op}[{backend}]")


def draw_cross_entropy_problem(data):
    """A random linear_cross_entropy call: (its arguments but the backend, (grad_output, fp64 d total / d row loss,
    the reduction's denominator))."""
    dtype = data.draw(float_dtypes(), label="dtype")
    lead = data.draw(st.sampled_from([(1,), (2, 3), ()]), label="leading dims")
    lead = lead or (dim(data, 1, 24, label="T"),)
    H, V = dim(data, 1, 40, label="H"), dim(data, 1, 64, label="V")
    ignore_index, reduction, num_items, smoothing, softcap = draw_ce_options(data)
    chunk = data.draw(st.sampled_from(CHUNKS), label="chunk_size")
    h = tensor(data, lead + (H,), dtype, label="hidden", requires_grad=True)
    W = tensor(data, (V, H), dtype, label="weight", scale=0.3,
               requires_grad=data.draw(st.booleans(), label="weight grad"))
    b = tensor(data, (V,), dtype, label="bias", requires_grad=True) if data.draw(st.booleans(), label="bias") else None
    labels = _labels(data, lead, V, ignore_index)
    weights = _row_weights(data, reduction, lead, dtype, int((labels != ignore_index).sum()), num_items)
    return dict(hidden=h, weight=W, labels=labels, bias=b, ignore_index=ignore_index, reduction=reduction,
                label_smoothing=smoothing, softcap=softcap, num_items=num_items, chunk_size=chunk), weights


def draw_kl_problem(data):
    """A random linear_kl_div call: (its arguments but the backend, (grad_output, fp64 d total / d row loss, the
    reduction's denominator))."""
    dtype = data.draw(float_dtypes(), label="dtype")
    lead = (dim(data, 1, 2, label="B"), dim(data, 1, 9, label="S"))
    Hs, Ht, V = dim(data, 1, 33, label="Hs"), dim(data, 1, 33, label="Ht"), dim(data, 1, 64, label="V")
    tau = data.draw(st.sampled_from([1.0, 0.7, 2.5]), label="temperature")
    reverse = data.draw(st.booleans(), label="reverse")
    reduction = data.draw(st.sampled_from(["mean", "sum", "none"]), label="reduction")
    ignore_index = -100
    labels = _labels(data, lead, V, ignore_index) if data.draw(st.booleans(), label="labels") else None
    num_items = data.draw(st.sampled_from([None, 5]), label="num_items") if reduction == "mean" else None
    chunk = data.draw(st.sampled_from(CHUNKS), label="chunk_size")
    hs = tensor(data, lead + (Hs,), dtype, label="student_hidden", requires_grad=True)
    Ws = tensor(data, (V, Hs), dtype, label="student_weight", scale=0.3,
                requires_grad=data.draw(st.booleans(), label="weight grad"))
    ht = tensor(data, lead + (Ht,), dtype, label="teacher_hidden")
    Wt = tensor(data, (V, Ht), dtype, label="teacher_weight", scale=0.3)
    T = hs.shape[0] * hs.shape[1]
    valid = T if labels is None else int((labels != ignore_index).sum())
    weights = _row_weights(data, reduction, lead, dtype, valid, num_items)
    return dict(student_hidden=hs, student_weight=Ws, teacher_hidden=ht, teacher_weight=Wt, temperature=tau,
                direction="reverse" if reverse else "forward", labels=labels, ignore_index=ignore_index,
                reduction=reduction, num_items=num_items, chunk_size=chunk), weights


def draw_distill_problem(data):
    """A random linear_distill_loss call (draw_kl_problem's, with term weights for the direction), and its weights."""
    call, weights = draw_kl_problem(data)
    del call["direction"]
    terms = [data.draw(st.sampled_from([0.0, 0.4, 1.0]), label=name)
             for name in ("kl_weight", "reverse_kl_weight", "ce_weight")]
    if call["labels"] is None:
        terms[2] = 0.0  # CE needs labels
    if not any(terms):
        terms[0] = 1.0
    call.update(zip(("kl_weight", "reverse_kl_weight", "ce_weight"), terms))
    return call, weights


def draw_logprobs_problem(data):
    """A random linear_sequence_logprobs call: (its arguments but the backend, grad_output (B,))."""
    dtype = data.draw(float_dtypes(), label="dtype")
    B, S = dim(data, 1, 3, label="B"), dim(data, 1, 9, label="S")
    H, V = dim(data, 1, 40, label="H"), dim(data, 1, 64, label="V")
    softcap = data.draw(st.sampled_from([None, 3.0]), label="softcap")
    chunk = data.draw(st.sampled_from(CHUNKS), label="chunk_size")
    h = tensor(data, (B, S, H), dtype, label="hidden", requires_grad=True)
    W = tensor(data, (V, H), dtype, label="weight", scale=0.3,
               requires_grad=data.draw(st.booleans(), label="weight grad"))
    b = tensor(data, (V,), dtype, label="bias", requires_grad=True) if data.draw(st.booleans(), label="bias") else None
    labels = _labels(data, (B, S), V, -100)
    g = tensor(data, (B,), torch.float32, label="grad_output")
    return dict(hidden=h, weight=W, labels=labels, bias=b, softcap=softcap, chunk_size=chunk), g


@pytest.mark.parametrize("backend", BACKENDS)
@fuzz(10)
@given(data=st.data())
def test_linear_cross_entropy(data, backend):
    op = "linear_cross_entropy"
    call, (g, w_rows, den) = draw_cross_entropy_problem(data)
    h, W, b, labels = (call[n] for n in ("hidden", "weight", "bias", "labels"))
    ignore_index, reduction, smoothing, softcap = (call[n] for n in ("ignore_index", "reduction", "label_smoothing",
                                                                     "softcap"))
    dtype, lead, H, T = h.dtype, tuple(labels.shape), h.shape[-1], labels.numel()
    loss = linear_cross_entropy(**call, backend=backend)
    assert loss.dtype == torch.float32 and tuple(loss.shape) == (lead if reduction == "none" else ())
    inputs = needing_grad((("x", h), ("weight", W), ("bias", b)))
    grads = grads_of(loss, inputs, g)

    z, e = ref.logit_error(h.reshape(T, H), W, b, dtype, LOGIT_N_ROUND)
    rows, dz, loss_err, dz_mag, dz_err = ref.ce_rows(z, e, labels.reshape(-1), ignore_index, smoothing, softcap)
    _check_reduced(op, f"{backend} loss[{reduction}]", loss, reduction, rows, loss_err, den, dtype)
    _check_head_grads(op, backend, inputs, grads, h.reshape(T, H), W, w_rows, (dz, dz_mag, dz_err), dtype)


def _run_teacher_loss(call, loss, g):
    """A KL-style call's (student hidden, head, labels, inputs wanting gradients, their gradients for grad_output g,
    the student's and the teacher's logits /τ with their error bounds, (z, e) each, rows flattened)."""
    hs, Ws, ht, Wt, labels = (call[n] for n in ("student_hidden", "student_weight", "teacher_hidden", "teacher_weight",
                                                "labels"))
    assert loss.dtype == torch.float32
    inputs = needing_grad((("x", hs), ("weight", Ws)))
    grads = grads_of(loss, inputs, g)
    T, tau = hs.shape[0] * hs.shape[1], call["temperature"]
    student = ref.logit_error(hs.reshape(T, hs.shape[-1]), Ws, None, hs.dtype, LOGIT_N_ROUND, 1 / tau)
    teacher = ref.logit_error(ht.reshape(T, ht.shape[-1]), Wt, None, hs.dtype, LOGIT_N_ROUND, 1 / tau)
    return hs, Ws, labels, inputs, grads, student, teacher


@pytest.mark.parametrize("backend", BACKENDS)
@fuzz(8)
@given(data=st.data())
def test_linear_kl_div(data, backend):
    op = "linear_kl_div"
    call, (g, w_rows, den) = draw_kl_problem(data)
    loss = linear_kl_div(**call, backend=backend)
    hs, Ws, labels, inputs, grads, (zs, es), (zt, et) = _run_teacher_loss(call, loss, g)
    tau, reverse, reduction, ignore_index = (call["temperature"], call["direction"] == "reverse", call["reduction"],
                                             call["ignore_index"])
    dtype, T, Hs = hs.dtype, zs.shape[0], hs.shape[-1]
    rows, dz, err, dz_mag, dz_err = ref.kl_rows(zs, es, zt, et, reverse)
    if labels is not None:
        keep = (labels.reshape(-1) != ignore_index).double()
        rows, err = rows * keep, err * keep
        dz, dz_mag, dz_err = dz * keep[:, None], dz_mag * keep[:, None], dz_err * keep[:, None]
    dz, dz_mag, dz_err = dz / tau, dz_mag / tau, dz_err / tau  # z = h·Wᵀ/τ
    _check_reduced(op, f"{backend} loss[{reduction}]", loss, reduction, rows, err, den, dtype)
    _check_head_grads(op, backend, inputs, grads, hs.reshape(T, Hs), Ws, w_rows, (dz, dz_mag, dz_err), dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@fuzz(8)
@given(data=st.data())
def test_linear_sequence_logprobs(data, backend):
    op = "linear_sequence_logprobs"
    call, g = draw_logprobs_problem(data)
    h, W, b, labels, softcap = (call[n] for n in ("hidden", "weight", "bias", "labels", "softcap"))
    dtype, (B, S, H) = h.dtype, h.shape
    out = linear_sequence_logprobs(**call, backend=backend)
    assert out.dtype == torch.float32 and tuple(out.shape) == (B,)
    inputs = needing_grad((("x", h), ("weight", W), ("bias", b)))
    grads = grads_of(out, inputs, g)

    T = B * S
    z, e = ref.logit_error(h.reshape(T, H), W, b, dtype, LOGIT_N_ROUND)
    rows, dz, loss_err, dz_mag, dz_err = ref.ce_rows(z, e, labels.reshape(-1), -100, 0.0, softcap)
    rows_bs = rows.view(B, S)
    ref.check(op, f"{backend} logprobs", out, -rows_bs.sum(-1), rows_bs.abs().sum(-1), dtype, 0, (S,),
              abs_floor=loss_err.view(B, S).sum(-1) + FP32_TINY)
    w_rows = (-ref.f64(g))[:, None].expand(B, S).reshape(-1)
    _check_head_grads(op, backend, inputs, grads, h.reshape(T, H), W, w_rows, (dz, dz_mag, dz_err), dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@fuzz(8)
@given(data=st.data())
def test_linear_distill_loss(data, backend):
    """The weighted sum of test_linear_kl_div's terms and the CE's, per row; the terms' gradients are summed in the
    compute dtype's chunk buffer: one rounding more per extra term."""
    op = "linear_distill_loss"
    call, (g, w_rows, den) = draw_distill_problem(data)
    loss = linear_distill_loss(**call, backend=backend)
    hs, Ws, labels, inputs, grads, (zs, es), (zt, et) = _run_teacher_loss(call, loss, g)
    tau, reduction, ignore_index = call["temperature"], call["reduction"], call["ignore_index"]
    dtype, T, Hs = hs.dtype, zs.shape[0], hs.shape[-1]
    keep = torch.ones(T, dtype=torch.float64) if labels is None else (labels.reshape(-1) != ignore_index).double()
    parts = []  # (weight, rows, dz, err, dz_mag, dz_err)
    for weight, reverse in ((call["kl_weight"], False), (call["reverse_kl_weight"], True)):
        if weight:
            rows, dz, err, dz_mag, dz_err = ref.kl_rows(zs, es, zt, et, reverse)
            k = keep[:, None] / tau  # z = h·Wᵀ/τ
            parts.append((weight, rows * keep, dz * k, err * keep, dz_mag * k, dz_err * k))
    if call["ce_weight"]:
        z, e = ref.logit_error(hs.reshape(T, Hs), Ws, None, dtype, LOGIT_N_ROUND)
        parts.append((call["ce_weight"], *ref.ce_rows(z, e, labels.reshape(-1), ignore_index)))
    rows, dz, err, dz_mag, dz_err = (sum(p[0] * p[i] for p in parts) for i in range(1, 6))
    dz_err = dz_err + (len(parts) - 1) * ref.UNIT_ROUNDOFF[dtype] * dz_mag
    _check_reduced(op, f"{backend} loss[{reduction}]", loss, reduction, rows, err, den, dtype)
    _check_head_grads(op, backend, inputs, grads, hs.reshape(T, Hs), Ws, w_rows, (dz, dz_mag, dz_err), dtype)
