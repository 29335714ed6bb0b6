"""Bad input to flash_attention raises a ValueError naming the argument and what was expected."""
from __future__ import annotations

import pytest
import torch

from fastft.ops import flash_attention


def dense(b=2, s=8, h=4, kv=2, d=64, dtype=torch.float32):
    return torch.randn(b, s, h, d, dtype=dtype), torch.randn(b, s, kv, d, dtype=dtype), \
        torch.randn(b, s, kv, d, dtype=dtype)


def packed(t=10, h=4, kv=2, d=64):
    return torch.randn(t, h, d), torch.randn(t, kv, d), torch.randn(t, kv, d)


CU = torch.tensor([0, 4, 10], dtype=torch.int32)


def _bad(kind):
    """(args, kwargs, message pattern) for one kind of bad input."""
    q, k, v = dense()
    if kind == "q_rank":
        return (q[0], k, v), {}, r"`q` must be 4-D \(batch, seqlen, heads, head_dim\)"
    if kind == "kv_shapes":
        return (q, k, v[:, :5]), {}, r"`k` and `v` must have the same shape"
    if kind == "head_dim_mismatch":
        return (q, k[..., :32], v[..., :32]), {}, r"`k` has head_dim 32 but `q` has 64"
    if kind == "head_dim_unsupported":
        q, k, v = dense(d=12)
        return (q, k, v), {}, r"head_dim must be a multiple of 8"
    if kind == "head_dim_too_big":
        q, k, v = dense(s=2, d=264)
        return (q, k, v), {}, r"head_dim must be a multiple of 8 in \[16, 256\]"
    if kind == "gqa_not_divisible":
        q, k, v = dense(h=4, kv=3)
        return (q, k, v), {}, r"`q` has 4 heads, which is not a multiple of the 3 KV heads"
    if kind == "dtype_mismatch":
        return (q, k.half(), v.half()), {}, r"`q`, `k`, `v` must share a dtype"
    if kind == "dtype_unsupported":  # fp64 goes to the torch backend on auto
        return (q.double(), k.double(), v.double()), {}, \
            r"backend='triton' computes in float16, bfloat16 or float32; `q` is torch.float64"
    if kind == "dtype_integer":
        return (q.int(), k.int(), v.int()), {}, r"`q` must be a floating-point tensor"
    if kind == "device_mismatch":
        return (q, k.to("meta"), v.to("meta")), {}, r"all tensors must be on one device"
    if kind == "batch_mismatch":
        return (q, k[:1], v[:1]), {}, r"`k` has batch 1 but `q` has 2"
    if kind == "cu_dtype":
        return packed(), dict(cu_seqlens=CU.long()), r"`cu_seqlens` must be a 1-D int32 tensor"
    if kind == "cu_length":
        return packed(), dict(cu_seqlens=CU[:1]), r"`cu_seqlens` must be a 1-D int32 tensor of length n_docs \+ 1"
    if kind == "cu_values":
        return packed(), dict(cu_seqlens=torch.tensor([0, 6, 4, 10], dtype=torch.int32)), \
            r"`cu_seqlens` must rise from 0 to the 10 packed tokens"
    if kind == "cu_total":
        return packed(), dict(cu_seqlens=torch.tensor([0, 4, 9], dtype=torch.int32)), \
            r"`cu_seqlens` must rise from 0 to the 10 packed tokens"
    if kind == "packed_rank":
        return (q, k, v), dict(cu_seqlens=CU), r"`q` must be 3-D \(total_tokens, heads, head_dim\) with cu_seqlens"
    if kind == "packed_tokens":
        q3, k3, v3 = packed()
        return (q3, k3[:7], v3[:7]), dict(cu_seqlens=CU), r"packed `q` has 10 tokens but `k` has 7"
    if kind == "max_seqlen_without_cu":
        return (q, k, v), dict(max_seqlen=8), r"`max_seqlen` only goes with `cu_seqlens`"
    if kind == "prefix_alone":
        return (q, k, v), dict(prefix_k=torch.randn(1, 3, 2, 64)), r"pass both `prefix_k` and `prefix_v`"
    if kind == "prefix_shape":
        p = torch.randn(1, 3, 4, 64)
        return (q, k, v), dict(prefix_k=p, prefix_v=p), r"`prefix_k` must have shape \(1 or 2, prefix_len, 2, 64\)"
    if kind == "prefix_batch":
        p = torch.randn(3, 3, 2, 64)
        return (q, k, v), dict(prefix_k=p, prefix_v=p), r"`prefix_k` must have shape \(1 or 2,"
    if kind == "prefix_dtype":
        p = torch.randn(1, 3, 2, 64, dtype=torch.float16)
        return (q, k, v), dict(prefix_k=p, prefix_v=p), r"`prefix_k` is torch.float16 but `q` is torch.float32"
    if kind == "scale":
        return (q, k, v), dict(softmax_scale=-1.0), r"`softmax_scale` must be a positive finite number"
    if kind == "window":
        return (q, k, v), dict(window=0), r"`window` must be a positive int"
    if kind == "window_type":
        return (q, k, v), dict(window=2.5), r"`window` must be a positive int"
    if kind == "causal_type":
        return (q, k, v), dict(causal="yes"), r"`causal` must be a bool"
    if kind == "backend":
        return (q, k, v), dict(backend="cuda"), r"`backend` must be one of"
    raise AssertionError(kind)


KINDS = ["q_rank", "kv_shapes", "head_dim_mismatch", "head_dim_unsupported", "head_dim_too_big", "gqa_not_divisible",
         "dtype_mismatch", "dtype_unsupported", "dtype_integer", "device_mismatch", "batch_mismatch", "cu_dtype",
         "cu_length", "cu_values", "cu_total", "packed_rank", "packed_tokens", "max_seqlen_without_cu",
         "prefix_alone", "prefix_shape", "prefix_batch", "prefix_dtype", "scale", "window", "window_type",
         "causal_type", "backend"]


@pytest.mark.parametrize("kind", KINDS)
def test_bad_input_raises_value_error(kind):
    args, kwargs, pattern = _bad(kind)
    # backend="triton" checks the cu_seqlens values too (the kernels rely on them)
    kwargs.setdefault("backend", "triton")
    with pytest.raises(ValueError, match=pattern):
        flash_attention(*args, **kwargs)
