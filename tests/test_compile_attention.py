"""flash_attention under torch.compile (fullgraph: no graph break) as the fastft::flash_attention custom op,
giving what eager gives, forward and backward, for each path that changes which tensors flow (dense, GQA,
varlen with and without max_seqlen, prefix, window; fp32 and bf16); torch.library.opcheck on the forward and
backward ops; the transformers attention function traced whole; and, on a GPU, mode="reduce-overhead" (CUDA
graphs) against eager. Triton through the interpreter on CPU (fastft.ops.compiled)."""
import pytest
import torch
from torch._dynamo.backends.debugging import aot_eager

import fastft.ops.attention as attention_ops
from fastft.ops import flash_attention
from fastft.ops.attention import flash_attention_backward_op, flash_attention_op, mask_bounds
from tests.compile_utils import assert_compiles_like_eager, leaves, run_with_grads
from tests.utils import interpreter_only

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
OPS = ("flash_attention",)


def _t(*shape, dtype=torch.float32, grad=True):
    return torch.randn(*shape, device=DEVICE, dtype=dtype).requires_grad_(grad)


def _qkv(*lead, heads=4, kv_heads=2, head_dim=16, dtype=torch.float32):
    return _t(*lead, heads, head_dim, dtype=dtype), _t(*lead, kv_heads, head_dim, dtype=dtype), \
        _t(*lead, kv_heads, head_dim, dtype=dtype)


def _cu(*bounds):
    return torch.tensor(bounds, dtype=torch.int32, device=DEVICE)


def _attend(**kw):
    return lambda q, k, v: flash_attention(q, k, v, backend="triton", **kw)


# ----------------------------------------------------------------------------------------------
# Traced like eager (CPU, interpreter)

@interpreter_only
def test_dense_causal_gqa_compiles():
    q, k, v = _qkv(2, 21)
    assert_compiles_like_eager(_attend(causal=True), q, k, v, ops=OPS)


@interpreter_only
def test_dense_full_window_bf16_compiles():
    """Non-causal (keys ahead too), a window, a given scale, heads == kv heads, bf16, head dim 32."""
    q, k, v = _qkv(1, 19, heads=2, kv_heads=2, head_dim=32, dtype=torch.bfloat16)
    assert_compiles_like_eager(_attend(causal=False, softmax_scale=0.3, window=6), q, k, v, ops=OPS)


@interpreter_only
def test_prefix_kv_cache_compiles():
    """Prefix keys/values (shared by the batch) get gradients through the traced backward too; more keys than
    queries (causal aligned bottom-right, as with a KV cache)."""
    q, k, v = _t(2, 9, 4, 16), _t(2, 17, 2, 16), _t(2, 17, 2, 16)
    pk, pv = _t(1, 5, 2, 16), _t(1, 5, 2, 16)
    assert_compiles_like_eager(lambda q, k, v, pk, pv: flash_attention(q, k, v, causal=True, prefix_k=pk, prefix_v=pv,
                                                                       backend="triton"), q, k, v, pk, pv, ops=OPS)


@interpreter_only
@pytest.mark.parametrize("max_seqlen", [None, 19])
def test_varlen_compiles(max_seqlen):
    """Packed documents; without max_seqlen the op body derives it (no .item() in the traced graph)."""
    q, k, v = _qkv(33)
    cu = _cu(0, 5, 5, 24, 33)  # an empty document too
    assert_compiles_like_eager(lambda q, k, v, cu: flash_attention(q, k, v, causal=True, cu_seqlens=cu,
                                                                   max_seqlen=max_seqlen, backend="triton"),
                               q, k, v, cu, ops=OPS)


@interpreter_only
def test_empty_packed_batch_with_a_prefix_compiles():
    """No tokens at all (found by tests/fuzz/test_compiled.py): the eager door's empty-q shortcut, the reference,
    reads cu_seqlens on the host, a data-dependent graph break; traced, the custom op answers it without a read
    (an empty output; zero gradients for the prefix)."""
    q, k, v = _qkv(0)
    pk, pv = _t(1, 3, 2, 16), _t(1, 3, 2, 16)
    assert_compiles_like_eager(lambda q, k, v, pk, pv, cu: flash_attention(q, k, v, cu_seqlens=cu, prefix_k=pk,
                                                                           prefix_v=pv, backend="triton"),
                               q, k, v, pk, pv, _cu(0, 0), ops=OPS)


@interpreter_only
def test_varlen_prefix_window_bf16_dynamic_compiles():
    """Per-document prefix, window and bf16, traced with dynamic shapes and max_seqlen as a symbolic int."""
    q, k, v = _qkv(30, heads=4, kv_heads=1, dtype=torch.bfloat16)  # (cu_seqlens has 3 entries: no size shared)
    pk, pv = (_t(2, 4, 1, 16, dtype=torch.bfloat16) for _ in range(2))
    assert_compiles_like_eager(
        lambda q, k, v, pk, pv, cu, m: flash_attention(q, k, v, causal=True, cu_seqlens=cu, max_seqlen=m, prefix_k=pk,
                                                       prefix_v=pv, window=7, backend="triton"),
        q, k, v, pk, pv, _cu(0, 12, 30), 18, ops=OPS, dynamic=True)


@interpreter_only
def test_dynamic_sequence_length_traces_once():
    """dynamic=True: a second sequence length reuses the one graph, and both match eager."""
    graphs = []

    def recording_backend(gm, example_inputs):
        graphs.append(gm.code)
        return aot_eager(gm, example_inputs)

    def fn(q, k, v):
        return flash_attention(q, k, v, causal=True, window=9, backend="triton")

    problems = [_qkv(2, 17), _qkv(2, 30)]
    torch._dynamo.reset()
    compiled = torch.compile(fn, backend=recording_backend, fullgraph=True, dynamic=True)
    for args in problems:
        want_out, want_grads = run_with_grads(fn, leaves(args))
        got_out, got_grads = run_with_grads(compiled, leaves(args))
        for got, want in zip(got_out + got_grads, want_out + want_grads):
            torch.testing.assert_close(got, want, atol=0.0, rtol=0.0)
    assert len(graphs) == 1, f"expected one graph for both sequence lengths, got {len(graphs)}"
    assert "torch.ops.fastft.flash_attention." in graphs[0]


# ----------------------------------------------------------------------------------------------
# The custom ops themselves

def _op_args(q, k, v, prefix_k=None, prefix_v=None, cu=None, max_seqlen=None, causal=True, window=None):
    return (q, k, v, prefix_k, prefix_v, cu, max_seqlen, q.shape[-1] ** -0.5, *mask_bounds(causal, window))


@interpreter_only
def test_flash_attention_opcheck():
    q, k, v = _qkv(1, 11, heads=2, kv_heads=1)
    torch.library.opcheck(flash_attention_op, _op_args(q, k, v))
    q, k, v = _qkv(20, heads=2, kv_heads=1)
    pk, pv = _t(1, 3, 1, 16), _t(1, 3, 1, 16)
    torch.library.opcheck(flash_attention_op, _op_args(q, k, v, pk, pv, _cu(0, 7, 20), None, window=5))


@interpreter_only
def test_flash_attention_backward_opcheck():
    q, k, v = (t.detach() for t in _qkv(1, 11, heads=2, kv_heads=1))
    o, lse = flash_attention_op(*_op_args(q, k, v))
    torch.library.opcheck(flash_attention_backward_op, (torch.randn_like(o), q, k, v, o, lse, *_op_args(q, k, v)[3:]))
    q, k, v = (t.detach() for t in _qkv(20, heads=2, kv_heads=1))
    pk, pv = torch.randn(2, 3, 1, 16, device=DEVICE), torch.randn(2, 3, 1, 16, device=DEVICE)
    args = _op_args(q, k, v, pk, pv, _cu(0, 7, 20), 13, window=5)
    o, lse = flash_attention_op(*args)
    torch.library.opcheck(flash_attention_backward_op, (torch.randn_like(o), q, k, v, o, lse, *args[3:]))


@interpreter_only
def test_no_max_seqlen_while_capturing_is_a_clear_error(monkeypatch):
    """While a CUDA graph is captured, deriving max_seqlen would read cu_seqlens on the host: refused with a
    message saying what to pass; a given max_seqlen reads nothing (the derivation is never called)."""
    q, k, v = (t.detach() for t in _qkv(20, heads=2, kv_heads=1))
    cu = _cu(0, 7, 20)
    monkeypatch.setattr(attention_ops, "capturing", lambda device: True)
    for door in (lambda: flash_attention(q, k, v, cu_seqlens=cu, backend="triton"),
                 lambda: flash_attention_op(*_op_args(q, k, v, cu=cu))):
        with pytest.raises(ValueError, match="pass `max_seqlen`.*capturing a CUDA graph"):
            door()

    def no_host_read(*args):
        raise AssertionError("cu_seqlens was read on the host while capturing")

    monkeypatch.setattr(attention_ops, "_read_cu_seqlens", no_host_read)
    monkeypatch.setenv("FASTFT_DEBUG", "1")  # its exact check syncs too: skipped while capturing
    got = flash_attention(q, k, v, causal=True, cu_seqlens=cu, max_seqlen=13, backend="triton")
    want = flash_attention_op(*_op_args(q, k, v, cu=cu, max_seqlen=13))[0]
    torch.testing.assert_close(got, want, atol=0.0, rtol=0.0)


# ----------------------------------------------------------------------------------------------
# The transformers attention function (fastft.integration.attention), traced whole

class _Layer(torch.nn.Module):
    is_causal = True
    layer_idx = 0


@interpreter_only
@pytest.mark.parametrize("packed", [None, "int", "tensor", "position_ids"])
def test_transformers_attention_function_compiles(packed, monkeypatch):
    """What a compiled Llama runs per layer: the plain causal path, the packing collator's (cu_seq_lens, with
    max lengths as ints or as tensors, which the op then reads itself), and a packed row marked by position_ids
    only (transformers' DataCollatorWithFlattening: cu_seqlens built in the graph, padded with empty documents).
    (A whole tiny Llama compiled fullgraph matched eager too, dense and packed; ~25 s each, so not in CI.)"""
    import fastft.integration.attention as integration

    monkeypatch.setattr(integration, "_backend", "triton")
    layer = _Layer()
    q = _t(1 if packed else 2, 4, 23, 16)  # transformers' (B, H, S, D)
    k, v = _t(q.shape[0], 2, 23, 16), _t(q.shape[0], 2, 23, 16)
    longest = torch.tensor(14, device=DEVICE) if packed == "tensor" else 14
    extra = dict(cu_seq_lens_q=_cu(0, 9, 23), cu_seq_lens_k=_cu(0, 9, 23), max_length_q=longest,
                 max_length_k=longest) if packed in ("int", "tensor") else {}
    if packed == "position_ids":
        extra = dict(position_ids=torch.cat([torch.arange(9), torch.arange(14)]).to(DEVICE)[None])

    def fn(q, k, v):
        return integration.fastft_attention_forward(layer, q, k, v, None, scaling=0.25, **extra)[0]

    assert_compiles_like_eager(fn, q, k, v, ops=OPS)


@pytest.mark.parametrize("window", [None, 3])
def test_a_padding_mask_compiles_without_reading_it(window):
    """generate() passes an all-ones mask: `bool(mask.all())` and unpadding read it (a graph break per layer).
    Traced, the mask goes to SDPA as transformers' sdpa takes it: fullgraph, eager's outputs, padded or not, at
    every position: the padded queries eager leaves at zero are zeros traced too (a right-padded query saw the
    real keys in SDPA, so a label left on a pad token, as `labels = input_ids.clone()` gives, trained otherwise
    compiled than eager)."""
    import fastft.integration.attention as integration

    layer = _Layer()
    q, k, v = _t(2, 4, 9, 16), _t(2, 2, 9, 16), _t(2, 2, 9, 16)

    def fn(q, k, v, mask):
        mask = integration.fastft_attention_mask(2, 9, 9, attention_mask=mask)
        return integration.fastft_attention_forward(layer, q, k, v, mask, scaling=0.25, sliding_window=window)[0]

    torch._dynamo.reset()
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    ones = torch.ones(2, 9, dtype=torch.long, device=DEVICE)
    left, right, both = ones.clone(), ones.clone(), ones.clone()
    left[1, :3] = 0
    right[0, 6:] = 0
    both[0, :2], both[1, 5:] = 0, 0
    for mask in (ones, left, right, both):
        got, want = compiled(q, k, v, mask), fn(q, k, v, mask)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        assert not want[~mask.bool()].any()  # eager's padded queries: zeros (none here sees a prefix)


@pytest.mark.parametrize("batch", [1, 2])
def test_packed_rows_with_an_all_ones_mask_stay_apart_while_compiled(batch):
    """position_ids restarting inside rows and an all-ones mask: eagerly the mask becomes None and the documents
    stay apart; traced, the mask went to SDPA with position_ids unread, and the documents attended to each other.
    A mask with padding keeps one document a row, as eagerly (unpadding)."""
    import fastft.integration.attention as integration

    layer = _Layer()
    q, k, v = _t(batch, 4, 10, 16), _t(batch, 2, 10, 16), _t(batch, 2, 10, 16)
    pos = torch.cat([torch.arange(4), torch.arange(6)]).to(DEVICE)[None].expand(batch, -1)

    def fn(q, k, v, mask):
        mask = integration.fastft_attention_mask(batch, 10, 10, attention_mask=mask)
        return integration.fastft_attention_forward(layer, q, k, v, mask, scaling=0.25, position_ids=pos)[0]

    torch._dynamo.reset()
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    ones = torch.ones(batch, 10, dtype=torch.long, device=DEVICE)
    padded = ones.clone()
    padded[-1, :2] = 0
    for mask in (ones, padded):
        got, want = compiled(q, k, v, mask), fn(q, k, v, mask)
        real = mask.bool()[:, :, None, None].expand_as(want)
        torch.testing.assert_close(got[real], want[real], atol=1e-5, rtol=1e-5)


def test_a_static_cache_mask_traces_without_a_graph_break():
    """transformers passes a static cache's offsets as tensors: comparing them branched on data (a graph break per
    layer, fullgraph refused). Traced, such a mask is transformers' 4-D one, which the attention runs with SDPA."""
    import fastft.integration.attention as integration

    def fn(q_offset, mask):
        return integration.fastft_attention_mask(1, 1, 12, q_offset=q_offset, kv_offset=0, attention_mask=mask)

    torch._dynamo.reset()
    mask = torch.ones(1, 12, dtype=torch.long, device=DEVICE)
    got = torch.compile(fn, backend="aot_eager", fullgraph=True)(torch.tensor(5, device=DEVICE), mask)
    assert got.shape == (1, 1, 1, 12) and got[0, 0, 0, :6].all() and not got[0, 0, 0, 6:].any()


def test_the_mask_function_traces_its_model_checks_as_constants():
    """The per-model-type checks (transformers' registries, a class's source) were traced at every compile, with
    dynamo's warning that it ignores their lru_cache; they are constants to it now, computed once, and a refused
    model is still refused while traced."""
    import warnings

    from transformers import BloomConfig, LlamaConfig

    import fastft.integration.attention as integration

    def fn(mask, config):
        return integration.fastft_attention_mask(2, 8, 8, attention_mask=mask, config=config,
                                                 allow_is_causal_skip=False)

    mask = torch.ones(2, 8, dtype=torch.long, device=DEVICE)
    mask[0, :3] = 0
    llama = LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4)
    torch._dynamo.reset()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = torch.compile(lambda m: fn(m, llama), backend="aot_eager", fullgraph=True)(mask)
    assert torch.equal(got, mask), got
    assert not [w for w in caught if "lru_cache" in str(w.message)], [str(w.message)[:100] for w in caught]
    torch._dynamo.reset()
    bloom = BloomConfig(vocab_size=64, hidden_size=32, n_layer=1, n_head=4)
    with pytest.raises(Exception, match="does not run its attention through transformers' attention interface"):
        torch.compile(lambda m: fn(m, bloom), backend="aot_eager", fullgraph=True)(mask)
    torch._dynamo.reset()


def test_packed_rows_of_a_larger_batch_are_refused_while_compiled(monkeypatch):
    """Rows of B > 1 are taken as unpacked while traced; an in-graph assertion (no sync) stops packed ones rather
    than attending across their documents. Unpacked rows run."""
    import fastft.integration.attention as integration

    layer = _Layer()
    q, k, v = _t(2, 4, 9, 16), _t(2, 2, 9, 16), _t(2, 2, 9, 16)

    def fn(q, k, v, pos):
        return integration.fastft_attention_forward(layer, q, k, v, None, scaling=0.25, position_ids=pos)[0]

    torch._dynamo.reset()
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    plain = torch.arange(9, device=DEVICE)[None].expand(2, -1)
    torch.testing.assert_close(compiled(q, k, v, plain), fn(q, k, v, plain))
    packed = torch.cat([torch.arange(4), torch.arange(5)]).to(DEVICE)[None].expand(2, -1)
    with pytest.raises(RuntimeError, match="cannot separate without reading them"):
        compiled(q, k, v, packed)


# ----------------------------------------------------------------------------------------------
# CUDA graphs (GPU only: never run on the CPU CI)

@pytest.mark.gpu
@pytest.mark.parametrize("case", ["dense_gqa_window", "varlen_prefix"])
def test_reduce_overhead_matches_eager(case):
    """mode="reduce-overhead" captures the forward and backward ops in CUDA graphs (no cudagraph skip) and the
    replays give eager's outputs and gradients, with new values copied into the same shapes each step."""
    from torch._dynamo.utils import counters

    if case == "dense_gqa_window":
        def fn(q, k, v):
            return flash_attention(q, k, v, causal=True, window=100)
        make = lambda: _qkv(2, 300, heads=8, kv_heads=2, head_dim=64, dtype=torch.bfloat16)  # noqa: E731
    else:
        cu = _cu(0, 100, 100, 357, 500)

        def fn(q, k, v, pk, pv):
            return flash_attention(q, k, v, causal=True, cu_seqlens=cu, max_seqlen=257, prefix_k=pk, prefix_v=pv)
        make = lambda: (*_qkv(500, heads=8, kv_heads=2, head_dim=64, dtype=torch.bfloat16),  # noqa: E731
                        _t(1, 10, 2, 64, dtype=torch.bfloat16), _t(1, 10, 2, 64, dtype=torch.bfloat16))

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(fn, mode="reduce-overhead", fullgraph=True)
    for step in range(4):  # warm-up, record, replays
        args = make()
        want_out, want_grads = run_with_grads(fn, leaves(args), seed=step)
        got_out, got_grads = run_with_grads(compiled, leaves(args), seed=step)
        for got, want in zip(got_out + got_grads, want_out + want_grads):
            torch.testing.assert_close(got.clone(), want, atol=2e-2, rtol=2e-2)  # atomic dQ adds in any order
    assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])


@pytest.mark.gpu
def test_reduce_overhead_without_max_seqlen_is_a_clear_error():
    """The warm-up run derives max_seqlen (no capture yet); the recording run refuses to, by name."""
    q, k, v = (t.detach() for t in _qkv(64, heads=4, kv_heads=2, head_dim=64, dtype=torch.bfloat16))
    cu = _cu(0, 20, 64)
    torch._dynamo.reset()
    compiled = torch.compile(lambda q, k, v: flash_attention(q, k, v, causal=True, cu_seqlens=cu),
                             mode="reduce-overhead", fullgraph=True)
    try:
        with pytest.raises(ValueError, match="pass `max_seqlen`"):
            for _ in range(4):
                compiled(q, k, v)
                torch.cuda.synchronize()
    finally:
        torch._dynamo.reset()  # drops the half-recorded CUDA-graph tree too


# ----------------------------------------------------------------------------------------------
# The torch backend (the CPU's default): packed documents as one op, fastft::attention_sdpa_varlen

def _attend_torch(**kw):
    return lambda q, k, v, cu: flash_attention(q, k, v, cu_seqlens=cu, backend="torch", **kw)


@pytest.mark.parametrize("case", ["causal_gqa", "window_bf16", "full_max_seqlen"])
def test_torch_backend_varlen_compiles(case):
    """Its per-document split reads cu_seqlens on the host: traced inline that was a graph break per layer (and
    a data-dependent-guard error under fullgraph). As an op: one graph, eager's outputs and gradients exactly."""
    dtype = torch.bfloat16 if case == "window_bf16" else torch.float32
    q, k, v = _qkv(37, heads=4, kv_heads=2 if case == "causal_gqa" else 4, dtype=dtype)
    cu = _cu(0, 6, 6, 25, 37)  # an empty document too
    kw = dict(causal=case != "full_max_seqlen", window=5 if case == "window_bf16" else None,
              max_seqlen=19 if case == "full_max_seqlen" else None)
    assert_compiles_like_eager(_attend_torch(**kw), q, k, v, cu, ops=("attention_sdpa_varlen",))


def test_torch_backend_varlen_prefix_compiles_and_checks_max_seqlen():
    """A prefix per document gets its gradients through the op; a max_seqlen below the longest document is still
    refused inside the op."""
    q, k, v = _qkv(20, heads=2, kv_heads=1)
    pk, pv = _t(2, 3, 1, 16), _t(2, 3, 1, 16)
    fn = lambda q, k, v, pk, pv, cu: flash_attention(q, k, v, causal=True, cu_seqlens=cu, prefix_k=pk,  # noqa: E731
                                                     prefix_v=pv, backend="torch")
    assert_compiles_like_eager(fn, q, k, v, pk, pv, _cu(0, 7, 20), ops=("attention_sdpa_varlen",))
    torch._dynamo.reset()
    short = torch.compile(lambda q, k, v, cu: flash_attention(q, k, v, cu_seqlens=cu, max_seqlen=10, backend="torch"),
                          backend="aot_eager", fullgraph=True)
    with pytest.raises(ValueError, match=r"`max_seqlen`=10 is smaller than the longest document \(13 tokens\)"):
        short(q, k, v, _cu(0, 7, 20))


def test_torch_backend_varlen_opcheck():
    from fastft.ops.attention import attention_sdpa_varlen_backward_op, attention_sdpa_varlen_op

    q, k, v = (t.detach() for t in _qkv(20, heads=2, kv_heads=1))
    pk, pv = torch.randn(2, 3, 1, 16, device=DEVICE), torch.randn(2, 3, 1, 16, device=DEVICE)
    for prefix in ((None, None), (pk, pv)):
        args = (q, k, v, *prefix, _cu(0, 7, 20), None, 0.25, True, 5)
        torch.library.opcheck(attention_sdpa_varlen_op, args)
        o = attention_sdpa_varlen_op(*args)
        # only test_autograd_registration: opcheck's other modes cannot see through the torch.func.vjp the body
        # runs (its TensorWrappers); the fake kernel and the op under aot_eager and inductor, static and dynamic
        # shapes, are what the tests above and test_torch_backend_varlen_compiles_dynamic run
        torch.library.opcheck(attention_sdpa_varlen_backward_op,
                              (torch.randn_like(o), q, k, v, *prefix, _cu(0, 7, 20), 0.25, True, 5),
                              test_utils=("test_autograd_registration",))


def test_torch_backend_varlen_compiles_dynamic():
    """Dynamic shapes (the token count symbolic): eager's outputs and gradients exactly."""
    q, k, v = _qkv(37, heads=4, kv_heads=2)
    assert_compiles_like_eager(_attend_torch(causal=True), q, k, v, _cu(0, 6, 6, 25, 37),
                               ops=("attention_sdpa_varlen",), dynamic=True)


def test_transformers_attention_function_compiles_on_the_torch_backend(monkeypatch):
    """A row packed by position_ids only (DataCollatorWithFlattening), on the CPU's default backend: traced whole."""
    import fastft.integration.attention as integration

    monkeypatch.setattr(integration, "_backend", "torch")
    q, k, v = _t(1, 4, 23, 16), _t(1, 2, 23, 16), _t(1, 2, 23, 16)
    position_ids = torch.cat([torch.arange(9), torch.arange(14)]).to(DEVICE)[None]

    def fn(q, k, v):
        return integration.fastft_attention_forward(_Layer(), q, k, v, None, scaling=0.25,
                                                    position_ids=position_ids)[0]

    assert_compiles_like_eager(fn, q, k, v, ops=("attention_sdpa_varlen",))
