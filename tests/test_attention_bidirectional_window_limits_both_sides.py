"""A window without causal keeps keys on both sides within w positions (as transformers' bidirectional sliding
window): key j is visible to query i when i - w < j < i + w (bottom-right aligned), checked against a mask written
out here rather than fastft's own mask_bounds."""
import torch

from fastft.ops import flash_attention
from fastft.ops.attention import visible_mask


def _explicit(n_q, n_k, w):
    off = n_k - n_q
    return torch.tensor([[(i + off) - w < j < (i + off) + w for j in range(n_k)] for i in range(n_q)])


def test_visible_mask_window_without_causal():
    for n_q, n_k, w in ((6, 6, 2), (3, 7, 3), (5, 5, 1)):
        assert torch.equal(visible_mask(n_q, n_k, False, w), _explicit(n_q, n_k, w))


def test_flash_attention_torch_window_without_causal():
    torch.manual_seed(0)
    B, S, H, D, w = 1, 8, 2, 16, 2
    q, k, v = (torch.randn(B, S, H, D, dtype=torch.float64) for _ in range(3))
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * D ** -0.5
    s = s.masked_fill(~_explicit(S, S, w), float("-inf"))
    want = torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), v).float()
    got = flash_attention(q.float(), k.float(), v.float(), causal=False, window=w, backend="torch")
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
