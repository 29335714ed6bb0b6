"""`max_seqlen` equal to the longest document is the contract's exact value: the cheap check
(max_seqlen · n_docs >= tokens) must accept it when the documents fill it exactly."""
import torch

from fastft.ops.attention import attention_reference, flash_attention


def test_max_seqlen_that_exactly_fits_is_accepted():
    torch.manual_seed(0)
    q, k, v = (torch.randn(12, 2, 16) for _ in range(3))
    for bounds, longest in (([0, 12], 12), ([0, 6, 12], 6)):
        cu = torch.tensor(bounds, dtype=torch.int32)
        out = flash_attention(q, k, v, causal=True, cu_seqlens=cu, max_seqlen=longest, backend="torch")
        ref = attention_reference(q.double(), k.double(), v.double(), causal=True, cu_seqlens=cu)
        torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
