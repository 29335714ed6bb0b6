"""Property-based fuzzing of `flash_attention` (both backends, dense and packed) against the fp64 reference."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fastft.ops.attention import flash_attention
from tests.fuzz import references as ref
from tests.fuzz.strategies import INT32_EDGES, dim, doc_lengths, float_dtypes, fuzz, tensor, windows
from tests.utils import interpreter_only

OP = "flash_attention"
def draw_problem(data, *, device="cpu", max_len=40, head_dims=(16, 24, 32), varlen=None):
    dtype = data.draw(float_dtypes(), label="dtype")
    D = data.draw(st.sampled_from(head_dims), label="head_dim")
    n_kv = data.draw(st.sampled_from([1, 2]), label="kv heads")
    H = n_kv * data.draw(st.sampled_from([1, 2]), label="group")
    varlen = data.draw(st.booleans(), label="varlen") if varlen is None else varlen
    scale = data.draw(st.sampled_from([1.0, 0.25, 3.0]), label="value scale")
    g = dict(device=device, scale=scale, requires_grad=True)
    kw = dict(causal=data.draw(st.booleans(), label="causal"), window=data.draw(windows(), label="window"),
              softmax_scale=data.draw(st.sampled_from([None, 0.05, 1.0]), label="softmax_scale"))
    if varlen:
        lengths = data.draw(doc_lengths(max_len=max_len // 2), label="doc lengths")
        total, n_seq = sum(lengths), len(lengths)
        cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=device)
        longest = max(lengths)
        kw["cu_seqlens"] = cu
        kw["max_seqlen"] = data.draw(st.one_of(st.none(), st.sampled_from([longest, longest + 5, total]),
                                               st.sampled_from(INT32_EDGES)), label="max_seqlen")
        if kw["max_seqlen"] is not None:
            kw["max_seqlen"] = max(kw["max_seqlen"], longest)
        q_shape, k_shape = (total, H, D), (total, n_kv, D)
    else:
        B = data.draw(st.sampled_from([1, 2]), label="batch")
        n_seq = B
        Sq, Sk = dim(data, 1, max_len, label="seqlen_q"), dim(data, 1, max_len, label="seqlen_k")
        q_shape, k_shape = (B, Sq, H, D), (B, Sk, n_kv, D)
    args = dict(q=tensor(data, q_shape, dtype, label="q", **g), k=tensor(data, k_shape, dtype, label="k", **g),
                v=tensor(data, k_shape, dtype, label="v", **g))
    P = data.draw(st.sampled_from([0, 0, 1, 5, 9]), label="prefix len")
    if P:
        pb = data.draw(st.sampled_from([1, n_seq]), label="prefix batch")
        args["prefix_k"] = tensor(data, (pb, P, n_kv, D), dtype, label="prefix_k", **g)
        args["prefix_v"] = tensor(data, (pb, P, n_kv, D), dtype, label="prefix_v", **g)
    do = tensor(data, q_shape, dtype, label="do", device=device)
    return args, kw, do


def run_and_check(args, kw, do, backend):
    inputs = {n: t for n, t in args.items() if t is not None}
    o = flash_attention(**args, **kw, backend=backend)
    grads = dict(zip(inputs, torch.autograd.grad(o, list(inputs.values()), do)))
    ref.check_attention(OP, backend, o, grads, inputs, do, kw)
    ref.count_example(f"{OP}[{backend}]")


@interpreter_only
@fuzz(20)
@given(data=st.data())
def test_flash_attention_dense_triton(data):
    run_and_check(*draw_problem(data, varlen=False), "triton")


@interpreter_only
@fuzz(15)
@given(data=st.data())
def test_flash_attention_varlen_triton(data):
    run_and_check(*draw_problem(data, varlen=True), "triton")


@fuzz(40)
@given(data=st.data())
def test_flash_attention_torch(data):
    run_and_check(*draw_problem(data), "torch")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "torch"])
@fuzz(20)
@given(data=st.data())
def test_flash_attention_gpu(data, backend):
    run_and_check(*draw_problem(data, device="cuda", max_len=400, head_dims=(16, 64, 80, 128, 256)), backend)
