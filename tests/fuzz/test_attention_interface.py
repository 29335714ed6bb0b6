"""Property-based fuzzing of attn_implementation='fastft' (fastft.integration.attention.fastft_attention_forward),
the glue between transformers and flash_attention: padded batches (left or right padding, unpadded into
documents), a KV cache with several new queries over padded keys (the SDPA fallback), packed rows (position_ids
or the collator's cu_seq_lens), custom 4-D masks; causal or not, sliding windows, GQA. Each row of the output
is compared, with its gradients, to the fp64 reference run on that row's own tokens."""
from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st

from tests.fuzz import references as ref
from tests.fuzz.strategies import dim, fuzz
from tests.utils import interpreter_only

OP = "attention_interface"
KINDS = ("no mask", "padded", "cache", "position_ids", "cu_seq_lens", "4-D mask")


class _Attention(torch.nn.Module):
    """What the interface reads from the calling attention module."""

    def __init__(self, causal: bool):
        super().__init__()
        self.is_causal, self.layer_idx = causal, 0


def draw_call(data):
    """(query, key, value, attention_mask, kwargs, rows): transformers' (B, H, S, D) layout; rows lists, per
    independent sequence, (batch index, query positions, key positions) of the tokens that must match the
    reference run on those tokens alone."""
    kind = data.draw(st.sampled_from(KINDS), label="kind")
    causal = data.draw(st.booleans(), label="causal") if kind not in ("cache",) else True
    window = data.draw(st.one_of(st.none(), st.integers(1, 12)), label="window")
    n_kv = data.draw(st.sampled_from([1, 2]), label="kv heads")
    H = n_kv * data.draw(st.sampled_from([1, 2]), label="group")
    D = data.draw(st.sampled_from([16, 24]), label="head_dim")
    B = 1 if kind in ("position_ids", "cu_seq_lens") else data.draw(st.sampled_from([1, 2, 3]), label="batch")
    n_k = dim(data, 1, 24, label="keys")
    n_q = dim(data, 1, n_k, label="queries") if kind == "cache" else n_k
    mask, kwargs, rows = None, {}, []
    full = list(range(n_k))
    if kind == "no mask":
        rows = [(b, list(range(n_k - n_q, n_k)), full) for b in range(B)]
    elif kind in ("padded", "cache"):
        left = kind == "cache" or data.draw(st.booleans(), label="left padding")
        # the cache's new queries are never padding: at most n_k - n_q padded keys
        most = n_k - n_q if kind == "cache" else n_k  # a row of padding only, too
        pads = [data.draw(st.integers(0, most), label=f"pad {b}") for b in range(B)]
        pos = torch.arange(n_k)
        mask = torch.stack([pos >= p if left else pos < n_k - p for p in pads])
        for b, p in enumerate(pads):
            keys = full[p:] if left else full[:n_k - p]
            rows.append((b, [i for i in range(n_k - n_q, n_k) if i in keys], keys))
    elif kind in ("position_ids", "cu_seq_lens"):
        cuts = sorted(data.draw(st.lists(st.integers(1, n_k - 1), max_size=3, unique=True), label="cuts")
                      if n_k > 1 else [])
        bounds = [0, *cuts, n_k]
        docs = [list(range(a, b)) for a, b in zip(bounds, bounds[1:])]
        rows = [(0, d, d) for d in docs]
        if kind == "position_ids":
            kwargs["position_ids"] = torch.cat([torch.arange(len(d)) for d in docs])[None]
        else:
            cu = torch.tensor(bounds, dtype=torch.int32)
            longest = max(len(d) for d in docs)
            kwargs.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=longest, max_length_k=longest)
    else:  # a 4-D boolean mask as transformers builds it: padding and causal/window written out
        from fastft.ops.attention import visible_mask

        pads = [data.draw(st.integers(0, n_k), label=f"pad {b}") for b in range(B)]
        keep = torch.stack([torch.arange(n_k) >= p for p in pads])
        mask = (keep[:, None, None, :] & visible_mask(n_k, n_k, causal, window))
        rows = [(b, full[p:], full[p:]) for b, p in enumerate(pads)]
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1), label="seed"))

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float32).requires_grad_(True)

    query, key, value = rand(B, H, n_q, D), rand(B, n_kv, n_k, D), rand(B, n_kv, n_k, D)
    return query, key, value, mask, dict(kwargs, sliding_window=window), causal, rows


def check_interface(data, backend: str):
    from fastft.integration.attention import fastft_attention_forward, register_attention

    query, key, value, mask, kwargs, causal, rows = draw_call(data)
    register_attention(backend)
    try:
        out, _ = fastft_attention_forward(_Attention(causal), query, key, value, mask, scaling=0.3, **kwargs)
    finally:
        register_attention("auto")
    n_q, n_k = query.shape[2], key.shape[2]
    off = n_k - n_q  # query i sits at key position i + off
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    # only the rows' own query tokens are compared: padded queries' outputs are unspecified
    picked = torch.zeros(out.shape[:2], dtype=torch.bool)
    for b, queries, _ in rows:
        picked[b, [i - off for i in queries]] = True
    dout = dout * picked[..., None, None]
    grads = torch.autograd.grad(out, (query, key, value), dout, allow_unused=True)
    grads = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, (query, key, value))]
    covered = [torch.zeros(t.shape[:3], dtype=torch.bool) for t in (query, key, value)]  # (B, heads, tokens)
    for b, queries, keys in rows:
        if not queries:
            continue
        qi = torch.tensor([i - off for i in queries])
        kj = torch.tensor(keys)
        # flash_attention's (1, tokens, heads, D) layout of this sequence's own tokens
        seq = dict(q=query.detach()[b, :, qi], k=key.detach()[b, :, kj], v=value.detach()[b, :, kj])
        seq = {n: t.transpose(0, 1)[None] for n, t in seq.items()}
        got = {n: g[b][:, idx].transpose(0, 1)[None] for n, g, idx in zip("qkv", grads, (qi, kj, kj))}
        kw = dict(causal=causal, softmax_scale=0.3, window=kwargs["sliding_window"])
        ref.check_attention(OP, f"{backend} sequence {b} {queries}", out[b, qi][None].detach(), got, seq,
                            dout[b, qi][None], kw)
        for c, idx in zip(covered, (qi, kj, kj)):
            c[b, :, idx] = True
    for name, g, c in zip(("dq", "dk", "dv"), grads, covered):  # tokens of no sequence: dout there is 0
        assert torch.equal(g[~c], torch.zeros_like(g[~c])), f"{name} of tokens outside every sequence is not 0"
    ref.count_example(f"{OP}[{backend}]")


@fuzz(40)
@given(data=st.data())
def test_attention_interface_torch(data):
    check_interface(data, "torch")


@interpreter_only
@fuzz(10)
@given(data=st.data())
def test_attention_interface_triton(data):
    check_interface(data, "triton")
