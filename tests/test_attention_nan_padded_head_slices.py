"""flash_attention on q/k/v/dout that are column slices of wider, NaN-filled storage (a fused projection's
output cut per head), with a head dim that is not a power of two (BLOCK_D > HEAD_DIM, pointer tiles).

Every tile load must stop at HEAD_DIM: a column past it is the neighbouring data (here NaN), and a NaN times
the zero-padded column of the other operand is still NaN. The existing cases use contiguous tensors, where an
unmasked column read lands on finite neighbouring values that only meet zeros.
"""
from __future__ import annotations

import pytest
import torch

from fastft.ops import flash_attention
from tests.attention_cases import reference_with_grads, run_with_grads
from tests.utils import assert_close, interpreter_only

pytestmark = interpreter_only


def _nan_padded(shape, head_dim, width):
    """A (…, head_dim) view of NaN-filled (…, width) storage, its first head_dim columns random."""
    buf = torch.full((*shape, width), float("nan"))
    buf[..., :head_dim] = torch.randn(*shape, head_dim)
    return buf[..., :head_dim]


@pytest.mark.parametrize("kw", [dict(causal=True), dict(causal=False, window=9)], ids=["causal", "window"])
def test_nan_padded_head_slices(kw):
    B, S, H, KV, D = 2, 70, 2, 1, 40  # BLOCK_D 64; 70 rows: two full 32-row blocks, one ragged
    args = dict(q=_nan_padded((B, S, H), D, 64), k=_nan_padded((B, S, KV), D, 64),
                v=_nan_padded((B, S, KV), D, 64), cu_seqlens=None)
    dout = _nan_padded((B, S, H), D, 64)
    out, grads = run_with_grads(flash_attention, args, dout, backend="triton", **kw)
    ref, ref_grads = reference_with_grads(args, dout.contiguous(), **kw)
    assert_close(out, ref, torch.float32, "out")
    for n, g in grads.items():
        assert_close(g, ref_grads[n], torch.float32, f"d{n}")
