"""The backward's masking of keys past the end when every real score is very negative.

A ragged key block loads zero K rows past n_k, so their recomputed score is 0 while the row's log-sum-exp is far
below it: exp2(0 - lse) overflows fp32 once lse < -128. The dK/dV kernel masks P by `keys < n_keys` for exactly
this (its comment says so); without that mask P = inf there, dS = inf, and the atomic dQ (the interpreter's default
config) adds inf·0 = NaN. The dQ kernel's prefix step (MASK 2) has the same bound on a ragged prefix. With ordinary
scores (lse near 0) the unmasked value is finite and multiplies only zero K/V rows, so no other test sees it.
"""
from __future__ import annotations

import pytest
import torch

from fastft.ops import flash_attention
from tests.attention_cases import reference_with_grads, run_with_grads
from tests.utils import assert_close, interpreter_only, rel_err

pytestmark = interpreter_only


# exp2 of the masked-out entries overflows before tl.where drops them (numpy warns under the interpreter)
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.parametrize("dq_path", ["atomic", "dq_kernel"])
@pytest.mark.parametrize("causal,prefix", [(True, 0), (False, 0), (True, 5)], ids=["causal", "full", "prefix"])
def test_ragged_keys_with_every_score_far_below_zero(monkeypatch, causal, prefix, dq_path):
    if dq_path == "dq_kernel":  # deterministic mode drops the atomic-dQ configs: the separate dQ kernel runs
        monkeypatch.setenv("FASTFT_DETERMINISTIC", "1")
    B, S, H, KV, D = 1, 45, 2, 1, 16  # 45 keys: the second 32-key block is ragged (and a 5-key prefix)
    u = torch.ones(D) / D ** 0.5
    # q·k ≈ -36 for every pair (± a little noise for a non-trivial softmax); scale 4 → base-2 scores ≈ -208
    q = -6 * u + 0.05 * torch.randn(B, S, H, D)
    k = 6 * u + 0.05 * torch.randn(B, S, KV, D)
    v = torch.randn(B, S, KV, D)
    args = dict(q=q, k=k, v=v, cu_seqlens=None)
    if prefix:
        args["prefix_k"] = 6 * u + 0.05 * torch.randn(1, prefix, KV, D)
        args["prefix_v"] = torch.randn(1, prefix, KV, D)
    kw = dict(causal=causal, softmax_scale=4.0)
    dout = torch.randn(B, S, H, D)
    out, grads = run_with_grads(flash_attention, args, dout, backend="triton", **kw)
    ref, ref_grads = reference_with_grads(args, dout, **kw)
    assert_close(out, ref, torch.float32, "out")
    for n, g in grads.items():
        if n == "q":
            # dQ = scale·Σ_j dS_j·k_j, and k's common 6u part meets Σ_j dS_j = 0: the backward's fp32 recompute of
            # the ≈-144 scores leaves Σ_j dS_j ~1e-4 off zero, times |6u|·scale (1.5-2.8e-4 relative on an AMD EPYC,
            # whose BLAS rounds the forward's and the backward's q·k apart; < 2e-5 where they round alike). What this
            # test is for, an unmasked key past the end, is NaN or inf (rel_err refuses those)
            err = rel_err(g, ref_grads[n])
            assert err <= 1e-3, f"dq: relative error {err:.3e} > 1e-3 (fp32, ill-conditioned by construction)"
        else:
            assert_close(g, ref_grads[n], torch.float32, f"d{n}")
