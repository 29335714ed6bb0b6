"""Property-based fuzzing of the traced door (fastft.ops.compiled) of the layer and PEFT method ops — rms_norm,
rope / rope_, swiglu / geglu, ia3_linear, bottleneck_adapter, dora_linear (dense and NF4 weights, dropout) — on the
Triton backend under torch.compile(fullgraph=True, backend=aot_eager) against the eager door on the same random
problems: the draws of test_layer_ops.py and test_method_ops.py (every layout, sizes 1 and odd, mixed dtypes). The
same kernels run behind both doors, so outputs and every gradient must agree exactly (checks.assert_doors_agree);
each eager door's accuracy against fp64 is its own fuzz file's. Where an op takes its torch reference for a drawn
problem, the compiler traces torch's own ops instead, which may round differently: the dtype's default tolerance."""
from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st

from fastft.ops.bottleneck_adapter import bottleneck_adapter
from fastft.ops.dora import dora_linear
from fastft.ops.glu import geglu, swiglu
from fastft.ops.ia3 import ia3_linear
from fastft.ops.rms_norm import rms_norm
from fastft.ops.rope import rope, rope_
from fastft.ops.shared import nf4_fused_ok
from tests.fuzz import test_layer_ops, test_method_ops
from tests.fuzz.checks import assert_doors_agree
from tests.fuzz.strategies import fuzz
from tests.utils import interpreter_only


@interpreter_only
@fuzz(4)
@given(data=st.data())
def test_rms_norm_compiled_equals_eager(data):
    """With and without a residual (its stream h an output too, with or without an upstream gradient), offset, both
    casts, the weight in every layout — or, drawn, only strided / stride-0 ones (test_rms_norm_strided_weight)."""
    if data.draw(st.booleans(), label="strided weight"):
        args, dy, dh = test_layer_ops.draw_rms_problem(data, weight_layouts=("last_strided", "expanded"), min_n=2)
    else:
        args, dy, dh = test_layer_ops.draw_rms_problem(data)
    kw = dict(eps=args["eps"], offset=args["offset"], cast=args["cast"], backend="triton")
    named = [(n, args[n]) for n in ("x", "weight", "residual")]
    grad = dy if args["residual"] is None else (dy,) if dh is None else (dy, dh)
    assert_doors_agree("rms_norm", lambda x, w, r: rms_norm(x, w, residual=r, **kw), named, grad)


@interpreter_only
@fuzz(4)
@given(data=st.data())
def test_rope_compiled_equals_eager(data):
    """Out of place: q and k of different head counts in any view, cos/sin broadcast over the batch or not."""
    q, k, cos, sin, unsq, do_q, do_k = test_layer_ops.draw_rope_problem(data)
    assert_doors_agree("rope", lambda q, k: rope(q, k, cos, sin, unsqueeze_dim=unsq, backend="triton"),
                       [("q", q), ("k", k)], (do_q, do_k))


@interpreter_only
@fuzz(3)
@given(data=st.data())
def test_rope_inplace_compiled_equals_eager(data):
    """rope_ on plain tensors (copies made inside the function: the eager in-place Function vs traced fastft::rope
    and copies), with autograd, or under no_grad (eager: the kernel in place; traced: fastft::rope_, mutating)."""
    q0, k0, cos, sin, unsq, do_q, do_k = test_layer_ops.draw_rope_problem(data, plain=True)
    grad = data.draw(st.booleans(), label="autograd")

    def fn(q0, k0):
        with torch.set_grad_enabled(grad):
            q, k = q0 * 1, k0 * 1
            q_out, k_out = rope_(q, k, cos, sin, unsqueeze_dim=unsq, backend="triton")
            assert q_out is q and k_out is k
            return q, k

    assert_doors_agree("rope_", fn, [("q", q0), ("k", k0)], (do_q, do_k) if grad else None)


@interpreter_only
@fuzz(4)
@given(data=st.data())
def test_glu_compiled_equals_eager(data):
    gelu = data.draw(st.booleans(), label="geglu")
    gate, up, dy = test_layer_ops.draw_glu_problem(data)
    op = geglu if gelu else swiglu
    assert_doors_agree(op.__name__, lambda g, u: op(g, u, backend="triton"), [("gate", gate), ("up", up)], dy)


@interpreter_only
@fuzz(4)
@given(data=st.data())
def test_ia3_linear_compiled_equals_eager(data):
    args, dy = test_method_ops.draw_ia3_problem(data)
    ff = args["feedforward"]
    named = [(n, args[n]) for n in ("x", "weight", "bias", "ia3_l")]
    fused = args["x"].dtype != torch.float16  # fp16 runs the torch reference (fastft.ops.ia3's docstring)
    assert_doors_agree("ia3_linear", lambda x, W, b, l: ia3_linear(x, W, b, l, feedforward=ff, backend="triton"),
                       named, dy, exact=fused, traced=fused)


@interpreter_only
@fuzz(4)
@given(data=st.data())
def test_bottleneck_adapter_compiled_equals_eager(data):
    args, dy = test_method_ops.draw_bottleneck_problem(data)
    act = args["activation"]
    named = [(n, args[n]) for n in ("h", "down_weight", "down_bias", "up_weight", "up_bias")]
    assert_doors_agree("bottleneck_adapter",
                       lambda h, D, bd, U, bu: bottleneck_adapter(h, D, bd, U, bu, act, backend="triton"), named, dy)


@interpreter_only
@fuzz(5)
@given(data=st.data())
def test_dora_linear_compiled_equals_eager(data):
    """Dense and NF4 weights, dropout 0 (the fused kernels; fastft::dora_row_norm and fastft::dora_linear) or > 0."""
    nf4 = data.draw(st.booleans(), label="nf4 weight")
    args, dy = test_method_ops.draw_dora_problem(data, nf4)
    s, p, W = args["scaling"], args["dropout_p"], args["weight"]
    # Dropout > 0 and NF4 rows of ragged K (not nf4_fused_ok) take dora_linear_reference (the row norm still the
    # Triton kernel): traced, torch's own ops, which may round differently. Its dropout mask is torch's, drawn
    # alike under one seed by both doors.
    exact = p == 0.0 and (not nf4 or nf4_fused_ok(W))
    named = [(n, args[n]) for n in ("x", "weight", "bias", "lora_A", "lora_B", "magnitude")]
    assert_doors_agree("dora_linear" + (" nf4" if nf4 else "") + (" dropout" if p > 0 else ""),
                       lambda x, W, b, A, B, m: dora_linear(x, W, b, A, B, m, s, p, backend="triton"), named, dy,
                       exact=exact)
