"""The fastft attention interface pads head sizes the kernels do not take (q/k and v of different sizes, sizes off
the multiple-of-8 grid) and crops the output, on every path it hands to the kernels: one batch, a padded batch
(unpadded), packed rows (position_ids restarting, and the collator's cu_seq_lens) and a prefix. The softmax scale
stays the q/k head size's when the layer passes none, and a v wider than q/k sets the padded size. Checked
against plain attention per document, on the interface itself (no model)."""
import types

import pytest
import torch

from fastft.integration.attention import fastft_attention_forward

H, KV = 4, 2


def _module():
    return types.SimpleNamespace(is_causal=True, layer_idx=0, config=types.SimpleNamespace())


def _qkv(B, S, d_qk, d_v, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, H, S, d_qk, generator=g), torch.randn(B, KV, S, d_qk, generator=g),
            torch.randn(B, KV, S, d_v, generator=g))


def _reference(q, k, v, scale, prefix=None):
    """Causal attention of one document: q (H, S, D), k/v (KV, S, D); prefix (pk, pv) as (P, KV, D), seen by all.
    Returns (S, H, d_v)."""
    k, v = k.repeat_interleave(H // KV, 0), v.repeat_interleave(H // KV, 0)
    S = q.shape[1]
    seen = torch.ones(S, S, dtype=torch.bool).tril()
    if prefix is not None:
        pk, pv = (p.transpose(0, 1).repeat_interleave(H // KV, 0) for p in prefix)
        k, v = torch.cat([pk, k], 1), torch.cat([pv, v], 1)
        seen = torch.cat([torch.ones(S, pk.shape[1], dtype=torch.bool), seen], 1)
    scores = (q @ k.transpose(-1, -2) * scale).masked_fill(~seen, float("-inf"))
    return (scores.softmax(-1) @ v).transpose(0, 1)


DIMS = [(20, 12), (12, 20), (24, 16)]  # q/k wider, v wider, both on the grid but unequal (MLA)


@pytest.mark.parametrize("d_qk, d_v", DIMS)
@pytest.mark.parametrize("scaling", [None, 0.3])
def test_one_batch(d_qk, d_v, scaling):
    q, k, v = _qkv(2, 7, d_qk, d_v)
    out, _ = fastft_attention_forward(_module(), q, k, v, None, scaling=scaling, is_causal=True)
    scale = d_qk ** -0.5 if scaling is None else scaling
    assert out.shape == (2, 7, H, d_v)
    for b in range(2):
        torch.testing.assert_close(out[b], _reference(q[b], k[b], v[b], scale), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("d_qk, d_v", DIMS)
def test_a_padded_batch(d_qk, d_v):
    q, k, v = _qkv(2, 7, d_qk, d_v, seed=1)
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0
    out, _ = fastft_attention_forward(_module(), q, k, v, mask, scaling=None, is_causal=True)
    assert out.shape == (2, 7, H, d_v)
    torch.testing.assert_close(out[0], _reference(q[0], k[0], v[0], d_qk ** -0.5), rtol=1e-5, atol=1e-5)
    n = 5
    torch.testing.assert_close(out[1, :n], _reference(q[1, :, :n], k[1, :, :n], v[1, :, :n], d_qk ** -0.5),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("d_qk, d_v", DIMS)
@pytest.mark.parametrize("how", ["position_ids", "cu_seq_lens"])
def test_packed_rows(d_qk, d_v, how):
    lengths = [4, 3, 2]
    T = sum(lengths)
    q, k, v = _qkv(1, T, d_qk, d_v, seed=2)
    if how == "position_ids":
        kw = {"position_ids": torch.cat([torch.arange(n) for n in lengths])[None]}
    else:
        cu = torch.tensor([0, 4, 7, 9], dtype=torch.int32)
        kw = {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": 4, "max_length_k": 4}
    out, _ = fastft_attention_forward(_module(), q, k, v, None, scaling=None, is_causal=True, **kw)
    assert out.shape == (1, T, H, d_v)
    start = 0
    for n in lengths:
        doc = slice(start, start + n)
        torch.testing.assert_close(out[0, doc], _reference(q[0, :, doc], k[0, :, doc], v[0, :, doc], d_qk ** -0.5),
                                   rtol=1e-5, atol=1e-5)
        start += n


@pytest.mark.parametrize("d_qk, d_v", [(20, 20), (20, 12)])
def test_a_prefix(d_qk, d_v):
    q, k, v = _qkv(2, 6, d_qk, d_v, seed=3)
    g = torch.Generator().manual_seed(4)
    prefix = (torch.randn(1, 3, KV, d_qk, generator=g), torch.randn(1, 3, KV, d_v, generator=g))
    out, _ = fastft_attention_forward(_module(), q, k, v, None, scaling=None, is_causal=True,
                                      fastft_prefix=[prefix])
    assert out.shape == (2, 6, H, d_v)
    for b in range(2):
        torch.testing.assert_close(out[b], _reference(q[b], k[b], v[b], d_qk ** -0.5, (prefix[0][0], prefix[1][0])),
                                   rtol=1e-5, atol=1e-5)
