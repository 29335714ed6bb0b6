"""Property-based fuzzing of the traced door (fastft.ops.compiled) of the fused losses — linear_cross_entropy,
linear_kl_div, linear_sequence_logprobs, lm_head_cross_entropy over every head kind, linear_dpo_loss — on the Triton
backend under torch.compile(fullgraph=True, backend=aot_eager) — fastft::linear_loss / linear_row_losses and their
backward, fastft::draw_seed for a LoRA head's dropout — against the eager door on the same random problems: the
draws of test_linear_losses.py and test_head_losses.py (every option, small chunks, views, fp32 inputs under
autocast, NF4 heads cut into vocab blocks, LoRA heads with dropout). The same kernels run behind both doors, so the
losses and every gradient must agree exactly (checks.assert_doors_agree); accuracy against fp64 is the eager fuzz
files' job."""
from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fastft.ops.linear_losses import (linear_cross_entropy, linear_dpo_loss, linear_kl_div, linear_sequence_logprobs,
                                      lm_head_cross_entropy)
from tests.fuzz import test_head_losses, test_linear_losses
from tests.fuzz.checks import assert_doors_agree
from tests.fuzz.strategies import fuzz
from tests.utils import interpreter_only


def _split(call, names):
    """(the (name, tensor) pairs of `names` — the compiled function's inputs —, the other arguments)."""
    return [(n, call[n]) for n in names], {n: v for n, v in call.items() if n not in names}


@interpreter_only
@fuzz(4)
@given(data=st.data())
def test_linear_cross_entropy_compiled_equals_eager(data):
    call, (g, _, _) = test_linear_losses.draw_cross_entropy_problem(data)
    named, rest = _split(call, ("hidden", "weight", "bias"))
    assert_doors_agree("linear_cross_entropy",
                       lambda h, W, b: linear_cross_entropy(h, W, bias=b, **rest, backend="triton"), named, g)


@interpreter_only
@fuzz(3)
@given(data=st.data())
def test_linear_kl_div_compiled_equals_eager(data):
    call, (g, _, _) = test_linear_losses.draw_kl_problem(data)
    named, rest = _split(call, ("student_hidden", "student_weight", "teacher_hidden", "teacher_weight"))
    assert_doors_agree("linear_kl_div", lambda hs, Ws, ht, Wt: linear_kl_div(hs, Ws, ht, Wt, **rest, backend="triton"),
                       named, g)


@interpreter_only
@fuzz(3)
@given(data=st.data())
def test_linear_sequence_logprobs_compiled_equals_eager(data):
    call, g = test_linear_losses.draw_logprobs_problem(data)
    named, rest = _split(call, ("hidden", "weight", "bias"))
    assert_doors_agree("linear_sequence_logprobs",
                       lambda h, W, b: linear_sequence_logprobs(h, W, bias=b, **rest, backend="triton"), named, g)


@interpreter_only
@pytest.mark.parametrize("kind", test_head_losses.HEADS)
@fuzz(2)
@given(data=st.data())
def test_lm_head_cross_entropy_compiled_equals_eager(data, kind):
    """The head module's trainable parameters are inputs of the compiled function too (used through the module):
    their gradients are compared with the hidden state's."""
    pb = test_head_losses.draw_lm_head_problem(data, "triton", kind)
    h, head, labels, dtype, store = (pb[n] for n in ("hidden", "head", "labels", "dtype", "store"))
    opts = {n: pb[n] for n in ("ignore_index", "reduction", "label_smoothing", "softcap", "num_items")}
    named = [("hidden", h)] + list(pb["trainable"].items())
    V = pb["facts"]["W"].shape[0]
    with test_head_losses.steered("triton", pb["rows"], V, dtype), test_head_losses.autocast("cpu", dtype, store):
        assert_doors_agree(f"lm_head_cross_entropy {kind}",
                           lambda h, *params: lm_head_cross_entropy(h, head, labels, **opts), named, pb["g"])


@interpreter_only
@fuzz(4)
@given(data=st.data())
def test_linear_dpo_loss_compiled_equals_eager(data):
    """The loss (differentiated) and both rewards (compared)."""
    import torch

    pb = test_head_losses.draw_dpo_problem(data)
    named, rest = _split(pb, ("policy_chosen_hidden", "policy_rejected_hidden", "weight", "bias", "ref_chosen_logps",
                              "ref_rejected_logps"))
    dtype, store, rows, g = (rest.pop(n) for n in ("dtype", "store", "rows", "g"))
    V = pb["weight"].shape[0]
    with test_head_losses.steered("triton", rows, V, dtype), test_head_losses.autocast("cpu", dtype, store):
        assert_doors_agree("linear_dpo_loss",
                           lambda hc, hr, W, b, rc, rr: linear_dpo_loss(hc, hr, W, bias=b, ref_chosen_logps=rc,
                                                                        ref_rejected_logps=rr, **rest),
                           named, (torch.tensor(g),))
