"""rope_cos_sin scales both tables by attention_scaling (YaRN / LongRoPE models set it != 1), as transformers'
rotary embedding does: cos·s and sin·s, and rope(position_ids=..., attention_scaling=s) rotates with them."""
import torch

from fastft.ops import rope, rope_cos_sin, rope_reference


def _expected(pos, inv_freq, s):
    freqs = pos.double()[..., None] * inv_freq.double()[None, None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * s).float(), (emb.sin() * s).float()


def test_both_tables_take_the_attention_scaling():
    pos = torch.tensor([[0, 1, 2, 3, 0, 1]])
    inv_freq = 1.0 / (10000 ** (torch.arange(0, 16, 2).float() / 16))
    for s in (1.0, 1.3):
        cos, sin = rope_cos_sin(pos, inv_freq, attention_scaling=s)
        ref_cos, ref_sin = _expected(pos, inv_freq, s)
        torch.testing.assert_close(cos, ref_cos, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(sin, ref_sin, rtol=1e-5, atol=1e-5)


def test_rope_from_positions_uses_the_scaled_tables():
    torch.manual_seed(0)
    pos = torch.tensor([[0, 1, 2, 3, 4, 5]])
    inv_freq = 1.0 / (10000 ** (torch.arange(0, 16, 2).float() / 16))
    q, k = torch.randn(1, 2, 6, 16), torch.randn(1, 1, 6, 16)
    cos, sin = _expected(pos, inv_freq, 1.3)
    want_q, want_k = rope_reference(q, k, cos, sin)
    got_q, got_k = rope(q, k, position_ids=pos, inv_freq=inv_freq, attention_scaling=1.3, backend="torch")
    torch.testing.assert_close(got_q, want_q, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_k, want_k, rtol=1e-5, atol=1e-5)
