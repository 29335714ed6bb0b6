"""The forward kernel's saved log-sum-exp, row by row: base 2 of the scaled scores over the visible keys (prefix
keys included), and +inf for a row that sees no key at all (the documented contract the backward relies on, so its
exp2(s - lse) is 0 there). The op tests only see lse through the gradients, where the masked steps zero those rows
anyway, so a -inf (or NaN) lse for an empty row would pass them.
"""
from __future__ import annotations

import math

import pytest
import torch

from fastft.ops.attention import mask_bounds, visible_mask
from tests.utils import interpreter_only

pytestmark = interpreter_only

CASES = {
    # 45 queries, 30 keys, causal bottom-right: rows 0..14 see no key
    "more_queries_than_keys": dict(n_q=45, n_k=30, causal=True, window=None, prefix=0),
    "window_gqa": dict(n_q=50, n_k=50, causal=True, window=7, prefix=0),
    "prefix_and_empty_rows": dict(n_q=40, n_k=21, causal=True, window=None, prefix=5),
}


@pytest.mark.parametrize("name", list(CASES))
def test_forward_lse_matches_base2_logsumexp(name):
    from fastft.kernels.attention_fwd import attention_forward

    c = CASES[name]
    B, H, KV, D = 2, 4, 2, 32
    q = torch.randn(B, c["n_q"], H, D)
    k = torch.randn(B, c["n_k"], KV, D)
    v = torch.randn(B, c["n_k"], KV, D)
    pk = pv = None
    if c["prefix"]:
        pk, pv = torch.randn(1, c["prefix"], KV, D), torch.randn(1, c["prefix"], KV, D)
    scale = D ** -0.5
    left, right = mask_bounds(c["causal"], c["window"])
    lse_buf = torch.full((B, H, c["n_q"]), float("nan"))
    _, lse = attention_forward(q, k, v, sm_scale=scale, left=left, right=right, prefix_k=pk, prefix_v=pv,
                               lse=lse_buf)

    kk = k.double().repeat_interleave(H // KV, dim=2)
    s = torch.einsum("bqhd,bkhd->bhqk", q.double(), kk) * scale
    s = s.masked_fill(~visible_mask(c["n_q"], c["n_k"], c["causal"], c["window"]), float("-inf"))
    if pk is not None:
        sp = torch.einsum("bqhd,bkhd->bhqk", q.double(), pk.double().repeat_interleave(H // KV, dim=2)) * scale
        s = torch.cat([sp, s], dim=-1)
    ref = torch.logsumexp(s, dim=-1) / math.log(2)  # base 2 of the scaled scores
    empty = torch.isneginf(ref)
    ref = torch.where(empty, torch.full_like(ref, float("inf")), ref)
    if c["prefix"] == 0 and c["n_q"] > c["n_k"]:
        assert empty.any()
    assert torch.equal(torch.isposinf(lse), empty), "rows without a visible key must get lse = +inf"
    assert torch.allclose(lse[~empty].double(), ref[~empty], rtol=0, atol=1e-4), (lse - ref).abs()[~empty].max()
