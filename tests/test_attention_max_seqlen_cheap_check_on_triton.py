"""The cheap max_seqlen check (n_docs · max_seqlen must hold every packed token) guards the Triton path, which
reads no cu_seqlens on the host (FASTFT_DEBUG off): a max_seqlen that cannot hold the tokens would leave rows
uncomputed. Refused before any kernel runs."""
import pytest
import torch

from fastft.ops import flash_attention
from tests.utils import interpreter_only


@interpreter_only
def test_too_small_max_seqlen_is_refused_on_triton(monkeypatch):
    monkeypatch.delenv("FASTFT_DEBUG", raising=False)
    q, k, v = torch.randn(10, 4, 64), torch.randn(10, 2, 64), torch.randn(10, 2, 64)
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"`max_seqlen`=2 is smaller than the longest document: 2 documents"):
        flash_attention(q, k, v, causal=True, cu_seqlens=cu, max_seqlen=2, backend="triton")
