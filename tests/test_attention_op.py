"""flash_attention against an fp64 softmax(QKᵀ/√d)V: output and every gradient (dq, dk, dv, dprefix_k, dprefix_v).

On the CPU the Triton kernels run through TRITON_INTERPRET=1 (backend="triton"); sizes stay small and
ragged. GPU tests (`-m gpu`) run every launch config the tuner may pick, into NaN-poisoned buffers.
"""
from __future__ import annotations

import itertools

import warnings

import pytest
import torch
import torch.nn.functional as F

from tests.attention_cases import grad_inputs, make_problem, reference_with_grads, run_with_grads
from fastft.ops import flash_attention
from fastft.ops.attention import attention_reference, attention_sdpa, mask_bounds, visible_mask
from tests.utils import assert_close, interpreter_only

CASES = {
    "causal_gqa_ragged": (dict(batch=2, seqlen_q=37, heads=4, kv_heads=2), dict(causal=True)),
    "full_mqa_d32": (dict(batch=1, seqlen_q=100, heads=3, kv_heads=1, head_dim=32), dict(causal=False)),
    "kv_cache_bottom_right": (dict(batch=1, seqlen_q=20, seqlen_k=53), dict(causal=True)),
    "more_queries_than_keys": (dict(batch=1, seqlen_q=45, seqlen_k=30, heads=2), dict(causal=True)),
    "single_query": (dict(batch=2, seqlen_q=1, seqlen_k=40, heads=2, kv_heads=1), dict(causal=True)),
    "sliding_window": (dict(batch=1, seqlen_q=90, heads=2, kv_heads=1), dict(causal=True, window=17)),
    "window_bidirectional": (dict(batch=1, seqlen_q=50, heads=2), dict(causal=False, window=9)),
    "prefix_shared": (dict(batch=2, seqlen_q=29, prefix=7), dict(causal=True)),
    "prefix_per_batch_d80_window": (dict(batch=2, seqlen_q=40, head_dim=80, prefix=19, prefix_batch=2),
                                    dict(causal=True, window=8)),
    "varlen": (dict(cu=[0, 1, 38, 38, 100]), dict(causal=True)),
    "varlen_prefix_window": (dict(cu=[0, 23, 60], heads=3, kv_heads=1, prefix=5, prefix_batch=2),
                             dict(causal=True, window=10)),
    "transformers_layout": (dict(batch=2, seqlen_q=33, layout="bhsd"), dict(causal=True, softmax_scale=0.3)),
    "head_dim_256": (dict(batch=1, seqlen_q=20, heads=2, kv_heads=1, head_dim=256), dict(causal=True)),
}


@interpreter_only
@pytest.mark.parametrize("name", list(CASES))
def test_matches_fp64_reference(name):
    shape, kw = CASES[name]
    args = make_problem(**shape)
    dout = torch.randn(args["q"].shape)
    out, grads = run_with_grads(flash_attention, args, dout, backend="triton", **kw)
    ref, ref_grads = reference_with_grads(args, dout, **kw)
    assert out.shape == args["q"].shape and out.dtype == args["q"].dtype
    assert_close(out, ref, torch.float32, f"{name}: out")
    for n, g in grads.items():
        assert_close(g, ref_grads[n], torch.float32, f"{name}: d{n}")


def test_deterministic_mode_drops_atomic_dq(monkeypatch):
    """torch.use_deterministic_algorithms(True) (or FASTFT_DETERMINISTIC=1, set at any time) leaves out the atomic
    dQ configs, whose fp32 adds land in a run-dependent order on a GPU; the GPU lists are read here too."""
    from fastft.kernels import attention_bwd
    monkeypatch.delenv("FASTFT_DETERMINISTIC", raising=False)
    assert not attention_bwd.deterministic()
    monkeypatch.setenv("FASTFT_DETERMINISTIC", "1")
    assert attention_bwd.deterministic()
    monkeypatch.delenv("FASTFT_DETERMINISTIC")
    previous = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        assert attention_bwd.deterministic()
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
    try:  # the GPU lists built here must not stay cached for later interpreter tests
        for interpret in (True, False):
            monkeypatch.setattr(attention_bwd, "INTERPRET", interpret)
            attention_bwd.backward_configs.cache_clear()
            for dtype in (torch.float32, torch.bfloat16):
                for head_dim in (64, 128, 256):
                    for tma, candidates in itertools.product((True, False), (False, True)):
                        free = attention_bwd.backward_configs(dtype, head_dim, tma, candidates=candidates)
                        kept = attention_bwd.backward_configs(dtype, head_dim, tma, True, candidates=candidates)
                        assert kept and not any(c["ATOMIC_DQ"] or c["DQ_REDUCE"] for c in kept), (dtype, head_dim, tma)
                        assert kept == [c for c in free if not c["ATOMIC_DQ"]] or len(kept) == 1
    finally:
        attention_bwd.backward_configs.cache_clear()


def test_backward_candidates_stay_out_of_the_tuners_list(monkeypatch):
    """Configs no GPU run has checked are offered to the GPU checks (candidates=True), never to the tuner: a
    config is the same kernel at other tile sizes, but one never run on a GPU could be silently wrong there."""
    from fastft.kernels import attention_bwd
    monkeypatch.setattr(attention_bwd, "INTERPRET", False)
    attention_bwd.backward_configs.cache_clear()
    try:
        tuned = attention_bwd.backward_configs(torch.bfloat16, 128, True)
        offered = attention_bwd.backward_configs(torch.bfloat16, 128, True, candidates=True)
        assert offered[:len(tuned)] == tuned and len(offered) > len(tuned)
        # the 4-warp tiles and the dQ by TMA reduce-adds
        assert all(c["WARPS"] == 4 or c["DQ_WARPS"] == 4 or c["DQ_REDUCE"] for c in offered[len(tuned):])
        assert any(c["DQ_REDUCE"] for c in offered) and not any(c["DQ_REDUCE"] for c in tuned)
        assert all(c["WARPS"] == 8 and c["DQ_WARPS"] == 8 for c in tuned if c["USE_TMA"])
    finally:
        attention_bwd.backward_configs.cache_clear()


@interpreter_only
def test_deterministic_backward_takes_the_dq_kernel(monkeypatch):
    from fastft.kernels import attention_bwd
    seen = []
    real = attention_bwd.tuner
    monkeypatch.setattr(attention_bwd, "tuner", lambda name, configs: seen.append(configs) or real(name, configs))
    monkeypatch.setenv("FASTFT_DETERMINISTIC", "1")
    args = make_problem(batch=1, seqlen_q=21, heads=2, kv_heads=1, head_dim=32)
    dout = torch.randn(args["q"].shape)
    _, grads = run_with_grads(flash_attention, args, dout, backend="triton", causal=True)
    _, ref_grads = reference_with_grads(args, dout, causal=True)
    assert seen and not any(c["ATOMIC_DQ"] for configs in seen for c in configs)
    assert_close(grads["q"], ref_grads["q"], torch.float32, "dq")


@interpreter_only
def test_last_dim_strided_inputs_and_bf16():
    """A non-unit last stride (copied by the op) and bf16 (the kernels' UPCAST path under the interpreter)."""
    args = make_problem(batch=1, seqlen_q=26, heads=2, kv_heads=1, prefix=3, dtype=torch.bfloat16)
    args["q"] = torch.randn(1, 26, 2, 128, dtype=torch.bfloat16)[..., ::2]
    dout = torch.randn(args["q"].shape, dtype=torch.bfloat16)
    out, grads = run_with_grads(flash_attention, args, dout, backend="triton", causal=True)
    ref, ref_grads = reference_with_grads(args, dout, causal=True)
    assert out.dtype == torch.bfloat16
    assert_close(out, ref, torch.bfloat16, "out")
    for n, g in grads.items():
        assert g.dtype == torch.bfloat16
        assert_close(g, ref_grads[n], torch.bfloat16, f"d{n}")


# ----------------------------------------------------------------------------------------------
# Launch configs, called at the launcher level into NaN-poisoned buffers (catches unwritten elements).

def _fwd_cfg(bm, bn, tma, ws=False, warps=4, stages=1, persistent=False):
    return dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages, USE_TMA=tma, WARP_SPECIALIZE=ws,
                PERSISTENT=persistent)


def _bwd_cfg(bn, bm, bm2, bn2, atomic, tma, warps=4, stages=1, reduce=False):
    return dict(BLOCK_N=bn, BLOCK_M=bm, WARPS=warps, STAGES=stages, BLOCK_M2=bm2, BLOCK_N2=bn2,
                DQ_WARPS=warps, DQ_STAGES=stages, ATOMIC_DQ=atomic, USE_TMA=tma, DQ_REDUCE=reduce)


def check_configs(args, fwd_configs, bwd_configs, dtype, causal=True, window=None, strict=True):
    """Every forward config and every backward config against the fp64 reference.

    strict=False (GPU): a config that cannot launch here (compile error, too much shared memory) is only
    warned about, as the tuner skips it too; at least one of each must run, and whatever runs must match.
    """
    from fastft.kernels.attention_bwd import attention_backward
    from fastft.kernels.attention_fwd import attention_forward

    q, k, v, pk, pv, cu = (args.get(n) for n in ("q", "k", "v", "prefix_k", "prefix_v", "cu_seqlens"))
    dout = torch.randn(q.shape, dtype=dtype, device=q.device)
    ref, ref_grads = reference_with_grads(args, dout, causal=causal, window=window)
    left, right = mask_bounds(causal, window)
    scale = q.shape[-1] ** -0.5
    max_seqlen = int(cu.diff().max()) if cu is not None else None
    common = dict(sm_scale=scale, left=left, right=right, cu_seqlens=cu, max_seqlen=max_seqlen,
                  prefix_k=pk, prefix_v=pv)
    lse_shape = (q.shape[1], q.shape[0]) if cu is not None else (q.shape[0], q.shape[2], q.shape[1])

    def launch(what, cfg, fn):
        try:
            return fn()
        except Exception as err:  # noqa: BLE001 - see strict
            if strict:
                raise
            warnings.warn(f"{what} config {cfg} cannot run here: {type(err).__name__}: {err}")
            return None

    o = lse = None
    for cfg in fwd_configs:
        out = torch.full_like(q, float("nan"))
        out_lse = torch.full(lse_shape, float("nan"), device=q.device)
        if launch("forward", cfg, lambda: attention_forward(q, k, v, config=cfg, out=out, lse=out_lse, **common)):
            assert_close(out, ref, dtype, f"forward {cfg}")
            o, lse = out, out_lse
    assert o is not None, "no forward config could run"
    ran = 0
    for cfg in bwd_configs:
        bufs = dict(dq=torch.full_like(q, float("nan")), dk=torch.full_like(k, float("nan")),
                    dv=torch.full_like(v, float("nan")))
        grads = launch("backward", cfg, lambda: attention_backward(dout, q, k, v, o, lse, config=cfg, **bufs, **common))
        if grads is None:
            continue
        ran += 1
        for n, g in zip(("q", "k", "v", "prefix_k", "prefix_v"), grads):
            if g is not None:
                assert_close(g, ref_grads[n], dtype, f"backward {cfg}: d{n}")
    assert ran, "no backward config could run"


@interpreter_only
@pytest.mark.parametrize("tma", [False, True], ids=["pointers", "descriptors"])
def test_launch_configs(tma):
    args = make_problem(batch=2, seqlen_q=45, heads=4, kv_heads=2, prefix=7)
    # persistent: 4 programs on the CPU (runtime.num_sms) walk 3 row blocks x 8 sequence-heads
    fwd = [_fwd_cfg(16, 32, tma), _fwd_cfg(32, 16, tma, ws=True), _fwd_cfg(16, 16, tma, persistent=True)]
    bwd = [_bwd_cfg(16, 32, 16, 32, True, tma), _bwd_cfg(32, 16, 32, 16, False, tma)]
    if tma:  # dQ by TMA reduce-adds (an atomic add through the descriptor's pointers under the interpreter)
        bwd.append(_bwd_cfg(16, 32, 16, 32, True, tma, reduce=True))
    check_configs(args, fwd, bwd, torch.float32, causal=True, window=21)


@interpreter_only
def test_launch_configs_packed_dq_kernel():
    """Packed documents through the separate dQ kernel (the interpreter's default config uses atomics), and through
    TMA reduce-adds into each document's own rows (a reduce clipped at the document's end)."""
    args = make_problem(cu=[0, 30, 31, 75], heads=4, kv_heads=2, prefix=6, prefix_batch=2)
    fwd = [_fwd_cfg(16, 32, False), _fwd_cfg(16, 32, True, persistent=True)]  # persistent: skips past short docs
    bwd = [_bwd_cfg(32, 16, 32, 16, False, True), _bwd_cfg(16, 32, 16, 32, True, True, reduce=True)]
    check_configs(args, fwd, bwd, torch.float32)


# ----------------------------------------------------------------------------------------------
# The reference itself, against independent implementations.

def test_reference_matches_sdpa_with_masks():
    q, k, v = torch.randn(2, 4, 23, 16, dtype=torch.float64), torch.randn(2, 2, 31, 16, dtype=torch.float64), \
        torch.randn(2, 2, 31, 16, dtype=torch.float64)
    for causal, window in ((True, None), (False, None), (True, 6), (False, 5)):
        mask = visible_mask(23, 31, causal, window)
        want = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                              attn_mask=mask).transpose(1, 2)
        got = attention_reference(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=causal,
                                  window=window)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_reference_prefix_is_concatenated_unmasked_kv():
    q = torch.randn(1, 12, 2, 16, dtype=torch.float64)
    k, v = torch.randn(1, 12, 2, 16, dtype=torch.float64), torch.randn(1, 12, 2, 16, dtype=torch.float64)
    pk, pv = torch.randn(1, 3, 2, 16, dtype=torch.float64), torch.randn(1, 3, 2, 16, dtype=torch.float64)
    mask = torch.cat([torch.ones(12, 3, dtype=torch.bool), visible_mask(12, 12, True, None)], dim=1)
    kk, vv = torch.cat([pk, k], 1).transpose(1, 2), torch.cat([pv, v], 1).transpose(1, 2)
    want = F.scaled_dot_product_attention(q.transpose(1, 2), kk, vv, attn_mask=mask).transpose(1, 2)
    got = attention_reference(q, k, v, causal=True, prefix_k=pk, prefix_v=pv)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_reference_packed_equals_block_diagonal_mask():
    cu = [0, 5, 5, 17, 30]
    q, k, v = (torch.randn(30, 2, 16, dtype=torch.float64) for _ in range(3))
    doc = torch.repeat_interleave(torch.arange(4), torch.tensor(cu).diff())
    mask = (doc[:, None] == doc[None, :]) & visible_mask(30, 30, True, None)
    want = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                          attn_mask=mask).transpose(0, 1)
    got = attention_reference(q, k, v, causal=True, cu_seqlens=torch.tensor(cu, dtype=torch.int32))
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_auto_backend_on_cpu_is_torch_sdpa():
    args = make_problem(batch=1, seqlen_q=9, heads=2, kv_heads=1, head_dim=16)
    out = flash_attention(**args, causal=True)
    torch.testing.assert_close(out, attention_sdpa(**args, causal=True), rtol=0, atol=0)
    torch.testing.assert_close(out, attention_reference(**args, causal=True))


@pytest.mark.parametrize("case", [
    dict(seqlen_q=13, seqlen_k=13, causal=True),                  # SDPA's own causal flag
    dict(seqlen_q=13, seqlen_k=13, causal=False),                 # no mask
    dict(seqlen_q=5, seqlen_k=13, causal=True),                   # bottom-right: a written-out mask
    dict(seqlen_q=13, seqlen_k=13, causal=True, window=4),
    dict(seqlen_q=9, seqlen_k=13, causal=False, window=3),
    dict(seqlen_q=13, seqlen_k=13, causal=True, prefix=3),
    dict(seqlen_q=13, seqlen_k=5, causal=True),                   # rows that see nothing: the reference's zeros
    dict(seqlen_q=13, seqlen_k=5, causal=True, prefix=2),         # ... unless a prefix gives them keys
    dict(seqlen_q=20, seqlen_k=4, causal=False, window=2),        # non-causal window past the keys: zeros too
])
def test_attention_sdpa_matches_the_reference(case):
    """The torch backend computes what the reference defines, every mask branch, fp64 forward and gradients."""
    case = dict(case)
    causal, window = case.pop("causal"), case.pop("window", None)
    args = make_problem(batch=2, heads=4, kv_heads=2, head_dim=16, dtype=torch.float64, **case)
    inputs = [args[n].requires_grad_(True) for n in grad_inputs(args)]
    got = attention_sdpa(**args, causal=causal, window=window)
    want = attention_reference(**args, causal=causal, window=window)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    do = torch.randn_like(got)
    grads = zip(grad_inputs(args), torch.autograd.grad(got, inputs, do), torch.autograd.grad(want, inputs, do))
    for name, g, w in grads:
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10, msg=name)


def test_attention_sdpa_packed_with_empty_documents():
    cu = torch.tensor([0, 5, 5, 17, 30], dtype=torch.int32)
    q, k, v = (torch.randn(30, 4, 16, dtype=torch.float64) for _ in range(3))
    pk, pv = (torch.randn(4, 2, 4, 16, dtype=torch.float64) for _ in range(2))
    for kw in (dict(causal=True), dict(causal=True, window=3), dict(causal=False, prefix_k=pk, prefix_v=pv)):
        torch.testing.assert_close(attention_sdpa(q, k, v, cu_seqlens=cu, **kw),
                                   attention_reference(q, k, v, cu_seqlens=cu, **kw), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=interpreter_only)])
def test_cu_seqlens_padded_with_empty_documents(backend):
    """cu_seqlens padded at the end with the total (empty documents: what the attention integration builds in a
    torch.compile graph from position_ids) gives the unpadded problem's output and gradients; without max_seqlen
    the op reads the values and drops the empty tail from its grid."""
    g = torch.Generator().manual_seed(3)
    args = {n: torch.randn(23, 4, 16, generator=g) for n in "qkv"}
    dout = torch.randn(23, 4, 16, generator=g)
    padded = torch.tensor([0, 9, 9, 23] + [23] * 20, dtype=torch.int32)
    got, got_grads = run_with_grads(flash_attention, args, dout, causal=True, cu_seqlens=padded, backend=backend)
    want, want_grads = reference_with_grads(args, dout, causal=True,
                                            cu_seqlens=torch.tensor([0, 9, 23], dtype=torch.int32))
    assert_close(got, want, torch.float32, "output")
    for name in "qkv":
        assert_close(got_grads[name], want_grads[name], torch.float32, f"d{name}")
    # a prefix per document (23 of them): the dropped empty ones get zero prefix gradients (the fuzz found a crash)
    args.update(prefix_k=torch.randn(23, 3, 4, 16, generator=g), prefix_v=torch.randn(23, 3, 4, 16, generator=g))
    got, got_grads = run_with_grads(flash_attention, args, dout, causal=True, cu_seqlens=padded, backend=backend)
    want, want_grads = reference_with_grads(args, dout, causal=True, cu_seqlens=padded)
    assert_close(got, want, torch.float32, "output with prefixes")
    for name in ("q", "k", "v", "prefix_k", "prefix_v"):
        assert_close(got_grads[name], want_grads[name], torch.float32, f"d{name} with prefixes")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kw", [dict(causal=True), dict(causal=True, window=9), dict(causal=False, prefix=True)],
                         ids=["causal", "window", "prefix"])
def test_attention_sdpa_half_inputs_save_no_fp32_copies(dtype, kw):
    """The torch backend keeps fp16/bf16 in their dtype (an fp32 copy of q, k, v and the output doubled what
    autograd saves: ~2x SDPA's memory in a bf16 CPU training step); its results stay within the dtype's tolerance
    of the fp64 reference."""
    kw = dict(kw)
    args = make_problem(batch=2, seqlen_q=41, heads=4, kv_heads=2, head_dim=16, dtype=dtype,
                        prefix=5 if kw.pop("prefix", False) else 0)
    dout = torch.randn(args["q"].shape, dtype=dtype)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        got, grads = run_with_grads(flash_attention, args, dout, backend="torch", **kw)
    big_fp32 = [tuple(t.shape) for t in saved if t.dtype == torch.float32 and t.numel() >= args["k"].numel()]
    assert not big_fp32, f"fp32 copies saved for backward: {big_fp32}"
    want, want_grads = reference_with_grads(args, dout, **kw)
    assert got.dtype == dtype
    assert_close(got, want, dtype, "output")
    for name, g in grads.items():
        assert_close(g, want_grads[name], dtype, f"d{name}")


# ----------------------------------------------------------------------------------------------
# GPU: every config the tuner may pick into poisoned buffers; the other paths with the first config only
# (FASTFT_AUTOTUNE=0), since every new specialisation costs a compile per config.

@pytest.fixture
def first_config_only(monkeypatch):
    monkeypatch.setenv("FASTFT_AUTOTUNE", "0")


@pytest.mark.gpu
def test_gpu_every_config_bf16():
    from fastft.kernels.attention import tma_eligible
    from fastft.kernels.attention_bwd import backward_configs
    from fastft.kernels.attention_fwd import forward_configs

    for _ in range(2):  # twice, fresh inputs: a race (the LoRA GEMM's warp-specialized configs) hit some launches only
        args = make_problem(batch=2, seqlen_q=333, heads=8, kv_heads=2, head_dim=128, prefix=19,
                            dtype=torch.bfloat16, device="cuda")
        tma = tma_eligible(128, args["q"], args["k"], args["v"])
        fwd = forward_configs(torch.bfloat16, 128, tma)
        bwd = backward_configs(torch.bfloat16, 128, tma, candidates=True)  # the untried ones too
        check_configs(args, fwd, bwd, torch.bfloat16, causal=True, strict=False)


GPU_CASES = [("varlen_prefix_window", torch.bfloat16), ("varlen_prefix_window", torch.float16),
             ("varlen_prefix_window", torch.float32), ("prefix_per_batch_d80_window", torch.bfloat16),
             ("transformers_layout", torch.bfloat16), ("more_queries_than_keys", torch.bfloat16),
             ("single_query", torch.float16)]


@pytest.mark.gpu
@pytest.mark.parametrize("name, dtype", GPU_CASES, ids=[f"{n}-{str(d)[6:]}" for n, d in GPU_CASES])
def test_gpu_paths(first_config_only, name, dtype):
    shape, kw = CASES[name]
    args = make_problem(**shape, dtype=dtype, device="cuda")
    dout = torch.randn(args["q"].shape, dtype=dtype, device="cuda")
    out, grads = run_with_grads(flash_attention, args, dout, **kw)
    ref, ref_grads = reference_with_grads(args, dout, **kw)
    assert_close(out, ref, dtype, f"{name}: out")
    for n, g in grads.items():
        assert_close(g, ref_grads[n], dtype, f"{name}: d{n}")


@pytest.mark.gpu
def test_gpu_long_causal_gqa_bf16(first_config_only):
    """Long enough for many unmasked blocks; fp32 reference on the GPU."""
    args = make_problem(batch=1, seqlen_q=2048 + 77, heads=8, kv_heads=2, head_dim=128, dtype=torch.bfloat16,
                        device="cuda")
    dout = torch.randn(args["q"].shape, dtype=torch.bfloat16, device="cuda")
    out, grads = run_with_grads(flash_attention, args, dout, causal=True)
    args32 = {n: (t.float() if isinstance(t, torch.Tensor) else t) for n, t in args.items()}
    ref, ref_grads = run_with_grads(attention_reference, args32, dout.float(), causal=True)
    assert_close(out, ref, torch.bfloat16, "out")
    for n, g in grads.items():
        assert_close(g, ref_grads[n], torch.bfloat16, f"d{n}")
