"""The unpadding memo (_once_per_forward: one host read per forward for the padding mask every layer gets) must key
on what its result depends on: the window. Gemma 2/3-style models alternate sliding and full layers on one mask;
with kept tokens before padding (prompt tuning's virtual tokens, then a left-padded row) the padded query right
before the first real token sees those kept tokens in a full layer, none of them in a sliding one. Reusing the
sliding layer's result in the full layer left that query at zero (it predicts the first real token's label)."""
import torch

from fastft.integration.attention import fastft_attention_forward


class _Attn(torch.nn.Module):
    is_causal, layer_idx = True, 0


def test_the_unpadding_memo_is_not_shared_between_window_sizes():
    torch.manual_seed(0)
    B, H, S, D = 1, 2, 8, 16
    q, k, v = (torch.randn(B, H, S, D) for _ in range(3))
    mask = torch.tensor([[1, 1, 1, 0, 0, 0, 1, 1]])  # virtual tokens, padding, tokens
    fastft_attention_forward(_Attn(), q, k, v, mask, scaling=D ** -0.5, sliding_window=2)  # a sliding layer
    full, _ = fastft_attention_forward(_Attn(), q, k, v, mask, scaling=D ** -0.5)  # then a full one, same mask
    fresh, _ = fastft_attention_forward(_Attn(), q, k, v, mask.clone(), scaling=D ** -0.5)  # no memo to reuse
    assert fresh[0, 5].abs().sum() > 0  # the edge query (position 5) attends to positions 0..2
    torch.testing.assert_close(full, fresh)
