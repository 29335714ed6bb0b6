"""The separate dQ kernel (deterministic mode; the interpreter's default config adds dQ with atomics instead) on
problems with n_q != n_k, where masks align bottom-right: q row i sits at key position i + n_k - n_q.

The existing dQ-kernel tests (deterministic mode, forced launch configs) all have n_q == n_k, so a dQ kernel that
dropped the bottom-right shift passed them; these cases pin it, with and without a window and a prefix.
"""
from __future__ import annotations

import pytest
import torch

from fastft.ops import flash_attention
from tests.attention_cases import make_problem, reference_with_grads, run_with_grads
from tests.utils import assert_close, interpreter_only

pytestmark = interpreter_only

CASES = {
    "kv_cache_bottom_right": (dict(batch=1, seqlen_q=20, seqlen_k=53, heads=2, kv_heads=1, head_dim=32),
                              dict(causal=True)),
    "more_queries_than_keys": (dict(batch=1, seqlen_q=45, seqlen_k=30, heads=2, kv_heads=1, head_dim=32),
                               dict(causal=True)),
    "window_shifted_prefix": (dict(batch=2, seqlen_q=24, seqlen_k=41, heads=2, kv_heads=2, head_dim=16, prefix=3),
                              dict(causal=True, window=6)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_dq_kernel_with_bottom_right_alignment(monkeypatch, name):
    from fastft.kernels import attention_bwd

    seen = []
    real = attention_bwd.tuner
    monkeypatch.setattr(attention_bwd, "tuner", lambda n, configs: seen.append(configs) or real(n, configs))
    monkeypatch.setenv("FASTFT_DETERMINISTIC", "1")  # no atomic-dQ config: the dQ kernel runs
    shape, kw = CASES[name]
    args = make_problem(**shape)
    dout = torch.randn(args["q"].shape)
    out, grads = run_with_grads(flash_attention, args, dout, backend="triton", **kw)
    ref, ref_grads = reference_with_grads(args, dout, **kw)
    assert seen and not any(c["ATOMIC_DQ"] for configs in seen for c in configs)
    assert_close(out, ref, torch.float32, f"{name}: out")
    for n, g in grads.items():
        assert_close(g, ref_grads[n], torch.float32, f"{name}: d{n}")
