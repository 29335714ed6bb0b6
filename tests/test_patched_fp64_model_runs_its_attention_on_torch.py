"""A patched model cast to fp64 (`.double()` before or after patch_model): fastft's attention refused fp64 on
backend="auto" ("q must be float16, bfloat16 or float32") where the unpatched model runs. auto sends fp64 to the
torch backend, as the layer ops do; backend="triton" still refuses it (the kernels accumulate in fp32)."""
import copy

import pytest
import torch

import fastft
from fastft.ops import flash_attention
from tests.utils import tiny_llama


@pytest.mark.parametrize("order", ["double_then_patch", "patch_then_double"])
def test_a_patched_fp64_model_matches_the_unpatched_one(order):
    model = tiny_llama()
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    reference = copy.deepcopy(model).double()
    if order == "double_then_patch":
        patched = fastft.patch_model(copy.deepcopy(model).double())
    else:
        patched = fastft.patch_model(copy.deepcopy(model)).double()
    with torch.no_grad():
        want = reference(input_ids=ids, labels=ids)
        got = patched(input_ids=ids, labels=ids)
    assert got.logits.dtype == torch.float64
    torch.testing.assert_close(got.logits, want.logits, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-12, atol=1e-12)


def test_fp64_attention_on_auto_is_exact():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 7, h, 64, generator=g, dtype=torch.float64) for h in (4, 2, 2))
    got = flash_attention(q, k, v, causal=True)
    kk, vv = k.repeat_interleave(2, dim=2), v.repeat_interleave(2, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, kk) / 8.0
    scores = scores.masked_fill(torch.ones(7, 7, dtype=torch.bool).triu(1), float("-inf"))
    want = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), vv)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
