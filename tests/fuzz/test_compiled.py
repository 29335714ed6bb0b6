"""Property-based fuzzing of the traced door (fastft.ops.compiled): `lora_linear` on the Triton backend under
torch.compile(fullgraph=True) — the fastft::lora_linear custom ops with their fake kernels — against the eager door
on the same random problems (every layout, sizes 0/1/odd, fp32 adapter masters, bias dtypes, dropout, both LoRA
paths). The same kernels run behind both doors, so outputs and every gradient must agree exactly; the eager door's
accuracy against fp64 is test_lora_linear.py's. One dynamo reset per example (fresh guards, no recompile limit)."""
from __future__ import annotations

import os
from unittest import mock

import torch
from hypothesis import given
from hypothesis import strategies as st
from torch._dynamo.backends.debugging import aot_eager

from fastft.ops.lora import lora_linear
from tests.fuzz import references as ref
from tests.fuzz.checks import grads_of, needing_grad
from tests.fuzz.strategies import fuzz
from tests.fuzz.test_lora_linear import draw_problem
from tests.utils import interpreter_only


def _run(fn, args, dy, seed):
    """fn's output and the gradients of the leaves, under one torch.manual_seed (the dropout seeds drawn alike)."""
    named = (("x", args["x"]), ("weight", args["weight"]), ("bias", args["bias"]), ("lora_A", args["lora_A"]),
             ("lora_B", args["lora_B"]))
    inputs = needing_grad(named)
    torch.manual_seed(seed)
    y = fn(*(t for _, t in named), args["scaling"], args["dropout_p"])
    return y.detach(), grads_of(y, inputs, dy, allow_unused=True)


@interpreter_only
@fuzz(6)
@given(data=st.data())
def test_lora_linear_compiled_equals_eager(data):
    args, dy = draw_problem(data)
    path = data.draw(st.sampled_from(["split", "fold"]), label="path")

    def op(x, W, b, A, B, s, p):
        return lora_linear(x, W, b, A, B, s, p, backend="triton")

    torch._dynamo.reset()
    with mock.patch.dict(os.environ, {"FASTFT_LORA_PATH": path}):
        y_eager, g_eager = _run(op, args, dy, seed=7)
        y_comp, g_comp = _run(torch.compile(op, backend=aot_eager, fullgraph=True), args, dy, seed=7)
    torch.testing.assert_close(y_comp, y_eager, atol=0, rtol=0)
    assert g_comp.keys() == g_eager.keys()
    for name in g_eager:
        if g_eager[name] is None:
            assert g_comp[name] is None, f"d{name}: eager gives none, compiled one"
            continue
        assert g_comp[name].dtype == g_eager[name].dtype, f"d{name} dtype"
        torch.testing.assert_close(g_comp[name], g_eager[name], atol=0, rtol=0, msg=lambda m: f"d{name}: {m}")
    ref.count_example("lora_linear compiled")
