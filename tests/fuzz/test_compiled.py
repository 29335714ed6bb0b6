"""Property-based fuzzing of the traced door (fastft.ops.compiled): lora_linear, qlora_linear / nf4_linear and
flash_attention on the Triton backend under torch.compile(fullgraph=True) — their fastft:: custom ops, fake kernels
and fastft::draw_seed — against the eager door on the same random problems (the draws of test_lora_linear.py,
test_qlora_linear.py and test_attention.py: every layout, sizes 0/1/odd, fp32 adapter masters, bias dtypes, dropout,
both LoRA paths, NF4 layouts, varlen, GQA, prefix, windows). The same kernels run behind both doors, so outputs and
every gradient must agree exactly; each eager door's accuracy against fp64 is its own fuzz file's. One dynamo reset
per example (fresh guards, no recompile limit)."""
from __future__ import annotations

import os
from unittest import mock

from hypothesis import given
from hypothesis import strategies as st

from fastft.ops import flash_attention, lora_linear, nf4_linear, qlora_linear
from fastft.ops.shared import nf4_fused_ok
from tests.fuzz import test_attention, test_lora_linear, test_qlora_linear
from tests.fuzz.checks import assert_doors_agree
from tests.fuzz.strategies import fuzz
from tests.utils import interpreter_only


@interpreter_only
@fuzz(6)
@given(data=st.data())
def test_lora_linear_compiled_equals_eager(data):
    args, dy = test_lora_linear.draw_problem(data)
    path = data.draw(st.sampled_from(["split", "fold"]), label="path")
    s, p = args["scaling"], args["dropout_p"]
    named = [(n, args[n]) for n in ("x", "weight", "bias", "lora_A", "lora_B")]
    # else the torch reference (nothing to launch), traced by the compiler: torch's own roundings, not exact (fuzz:
    # d(bias) of an empty x summed in another order, 1 ulp)
    traced = args["x"].numel() > 0 and args["weight"].shape[0] > 0
    with mock.patch.dict(os.environ, {"FASTFT_LORA_PATH": path}):
        assert_doors_agree("lora_linear", lambda x, W, b, A, B: lora_linear(x, W, b, A, B, s, p, backend="triton"),
                           named, dy, exact=traced, traced=traced)


@interpreter_only
@fuzz(4)
@given(data=st.data())
def test_qlora_family_compiled_equals_eager(data):
    lora = data.draw(st.booleans(), label="lora")
    args, dy = test_qlora_linear.draw_problem(data, lora=lora)
    named = [(n, args.get(n)) for n in ("x", "qweight", "bias")]
    fused = nf4_fused_ok(args["qweight"])  # rows of whole blocks: the fused kernels; else the torch reference
    traced = args["x"].numel() > 0 and (lora or fused)  # nf4_linear's reference is plain torch, as is an empty x
    exact = fused and args["x"].numel() > 0
    if lora:
        s, p = args["scaling"], args["dropout_p"]
        named += [("lora_A", args["lora_A"]), ("lora_B", args["lora_B"])]
        assert_doors_agree("qlora_linear",
                           lambda x, W, b, A, B: qlora_linear(x, W, b, A, B, s, p, backend="triton"), named, dy,
                           exact=exact, traced=traced)
    else:
        assert_doors_agree("nf4_linear", lambda x, W, b: nf4_linear(x, W, b, backend="triton"), named, dy,
                           exact=exact, traced=traced)


@interpreter_only
@fuzz(4)
@given(data=st.data())
def test_flash_attention_compiled_equals_eager(data):
    args, kw, do = test_attention.draw_problem(data, max_len=24)
    names = [n for n in ("q", "k", "v", "prefix_k", "prefix_v") if n in args]
    named = [(n, args[n]) for n in names]
    assert_doors_agree("flash_attention",
                       lambda *t: flash_attention(**dict(zip(names, t)), **kw, backend="triton"), named, do)
