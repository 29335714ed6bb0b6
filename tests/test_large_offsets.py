"""Kernels address tensors past 2**31 elements: an index times its stride is computed in int64 wherever it can pass 2**31.

At scale (Qwen2.5-7B's 18,944-wide MLP at 113k tokens a call, Llama-3-70B's at 75k) `row * stride` passes 2**31;
in int32 it wrapped and read (or wrote) up to 4 GB before the tensor: silently wrong LoRA outputs and gradients.
Tested without such tensors: a (40, 64) view with row stride 2**26 placed 2**31 elements into a buffer that is
never touched there (the pages cost nothing), so rows 32..39 lie past 2**31 and a wrapped offset reads zeros.
The same for a weight's rows (W of 2**31 elements or more), column-strided operands and attention's batch and head
strides: the int32-overflow audit in docs/fuzz-results.md."""
import pytest
import torch

from fastft.kernels import bottleneck_adapter, column_dot, dora_row_norm, lora_gemm, nf4_gemm, rank_ops
from fastft.kernels.attention import MAX_GRID_YZ, grid_rows
from fastft.kernels.nf4_dequant import nf4_dequantize

pytestmark = pytest.mark.anydevice  # the GPU script runs it on CUDA too

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
M, K, STRIDE = 40, 64, 2**26  # rows 32.. start past 2**31 elements


def _far(shape, strides, seed, dtype=torch.bfloat16, scale=1.0):
    """A view of `shape`/`strides` starting 2**31 elements into an untouched buffer, filled with random values:
    an element whose offset from the view passes 2**31 wraps (int32) into the buffer's untouched front (zeros)."""
    size = 2**31 + sum((n - 1) * s for n, s in zip(shape, strides)) + 1
    buffer = torch.zeros(size, dtype=dtype, device=DEVICE) if DEVICE.type == "cuda" \
        else torch.empty(size, dtype=dtype)  # lazily committed: only the view's pages are touched
    x = buffer.as_strided(shape, strides, 2**31)
    x.copy_((torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale).to(dtype))
    return x


def _far_rows(seed: int) -> torch.Tensor:
    """(M, K) bf16 of random values with row stride STRIDE, 2**31 elements into an untouched buffer (where an
    offset wrapped by 2**32 lands: zeros on the GPU, untouched pages on the CPU; no fault either way)."""
    return _far((M, K), (STRIDE, 1), seed)


def _assert_rows_close(got, want, what):
    """Every row (those past 2**31 too) within bf16 rounding of the fp32 reference."""
    err = (got.float() - want).norm(dim=-1) / want.norm(dim=-1).clamp(min=1e-6)
    assert float(err.max()) < 3e-2, f"{what}: relative row errors {err.tolist()}"


def _randn(*shape, seed=1, scale=1.0):
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale).to(torch.bfloat16).to(DEVICE)


@pytest.fixture(params=["descriptors", "pointers"])
def gemm_path(request, monkeypatch):
    """The descriptor (TMA) GEMMs, and the pointer-load ones every GPU before sm_90 runs."""
    if request.param == "pointers":
        monkeypatch.setattr(lora_gemm, "has_tma", lambda device: False)
        monkeypatch.setattr(nf4_gemm, "has_tma", lambda device: False)
    elif not lora_gemm.has_tma(DEVICE):
        pytest.skip("no tensor descriptors on this device")
    return request.param


def test_lora_gemm(gemm_path):
    x = _far_rows(0)
    w, lo, t = _randn(96, K, scale=0.125), _randn(M, 16, seed=2), _randn(96, 16, seed=3, scale=0.25)
    _assert_rows_close(lora_gemm.lora_gemm(x, w, lo, t, None, b_nk=True),
                       x.float() @ w.float().T + lo.float() @ t.float().T, "lora_gemm")


def test_nf4_lora_gemm(gemm_path):
    x = _far_rows(0)
    w = nf4_gemm.random_nf4_operand(96, K, DEVICE, torch.Generator().manual_seed(3))
    dense = nf4_dequantize(w.packed, w.absmax, 96 * K, w.blocksize, torch.float32, w.code, absmax2=w.absmax2,
                           code2=w.code2, offset=w.offset, nested_blocksize=w.nested_blocksize).view(96, K)
    lo, t = _randn(M, 16, seed=2), _randn(96, 16, seed=3, scale=0.25)
    _assert_rows_close(nf4_gemm.nf4_lora_gemm(x, w, lo, t, None, w_nk=True),
                       x.float() @ dense.T + lo.float() @ t.float().T, "nf4_lora_gemm")


def test_rank_project_and_reduce():
    x, a = _far_rows(0), _randn(16, K, seed=2)
    _assert_rows_close(rank_ops.rank_project(x, a, scale=1.0), x.float() @ a.float().T, "rank_project")
    g, xs, dy = _randn(M, 16, seed=3), _randn(M, 16, seed=4), _randn(M, 32, seed=5)
    da, db = rank_ops.rank_reduce_pair(g, x, xs, dy)
    _assert_rows_close(da, g.float().T @ x.float(), "rank_reduce_pair dA")  # a wrapped row drops its term
    _assert_rows_close(db, dy.float().T @ xs.float(), "rank_reduce_pair dB")


def test_column_dot():
    x, y = _far_rows(0), _randn(M, K, seed=2)
    got, want = column_dot.column_dot(x, y), (x.float() * y.float()).sum(0)
    assert float((got - want).norm() / want.norm()) < 1e-5


def test_bottleneck_down_projection():
    x, d = _far_rows(0), _randn(16, K, seed=2, scale=0.125)
    _, p = bottleneck_adapter.down_act(x, d, None, "relu")
    _assert_rows_close(p, x.float() @ d.float().T, "bottleneck down_act")


def test_attention_grids_keep_sequences_and_heads_apart():
    # 2,100 packed documents × 32 heads were one grid axis of 67,200 programs (CUDA allows 65,535)
    blocks, heads, sequences = grid_rows(2100, 32, 300, 64)
    assert (blocks, heads, sequences) == (5, 32, 2100) and max(heads, sequences) <= MAX_GRID_YZ
    with pytest.raises(ValueError, match="65535"):
        grid_rows(MAX_GRID_YZ + 1, 8, 128, 64)


# ----------------------------------------------------------------------------------------------
# The int32-overflow audit (docs/fuzz-results.md, 2026-12-05): the weight's own offsets, column strides, attention
# head strides, and the row kernels that were int64 already (guards: each fails if its cast is dropped).

N_FAR = 40  # a far operand's long dimension: indices 32.. start past 2**31 elements


def _far_weight(seed, scale=0.125):
    """W (N_FAR, K) whose rows 32.. lie past 2**31 elements: what every row of a W ≥ 2**31 elements (Nemotron-4-340B's
    untied 256000 × 18432 head, 4.7e9) past the 2**31st element is to the kernels' W offsets."""
    return _far((N_FAR, K), (STRIDE, 1), seed, scale=scale)


def _far_columns(rows, seed, dtype=torch.bfloat16):
    """(rows, N_FAR) column-major with column stride STRIDE: columns 32.. lie past 2**31 elements."""
    return _far((rows, N_FAR), (1, STRIDE), seed, dtype)


def _assert_close(got, want, what, tol=3e-2):
    err = float((got.detach().float() - want.detach().float()).norm() / want.detach().float().norm())
    assert err < tol, f"{what}: relative error {err}"


def test_lora_gemm_weight_past_2_31(gemm_path):
    """W's row offsets (n·K in the forward, k·N for dx) were int32 in the pointer GEMM's B operand (load_kn_block)."""
    w = _far_weight(0)
    x, lo, t = _randn(32, K, seed=1), _randn(32, 16, seed=2), _randn(N_FAR, 16, seed=3, scale=0.25)
    _assert_close(lora_gemm.lora_gemm(x, w, lo, t, None, b_nk=True),
                  x.float() @ w.float().T + lo.float() @ t.float().T, "lora_gemm forward")
    dy, g, a = _randn(32, N_FAR, seed=4), _randn(32, 16, seed=5), _randn(16, K, seed=6, scale=0.25)
    _assert_close(lora_gemm.lora_gemm(dy, w, g, a, None, b_nk=False),
                  dy.float() @ w.float() + g.float() @ a.float(), "lora_gemm dx")
    y, xs = lora_gemm.lora_gemm_folded(x, w, a, t, None, b_nk=True, scale=0.5)
    _assert_close(y, x.float() @ w.float().T + xs.float() @ t.float().T, "lora_gemm_folded forward")


def test_lora_linear_weight_past_2_31(gemm_path):
    """The op end to end (forward, dx, dA, dB) with such a W, on both GEMM paths."""
    from fastft.ops.lora import lora_linear

    w = _far_weight(0)
    x = _randn(2, 16, K, seed=1).requires_grad_()
    lora_A = _randn(8, K, seed=2, scale=0.25).requires_grad_()
    lora_B = _randn(N_FAR, 8, seed=3, scale=0.25).requires_grad_()
    dy = _randn(2, 16, N_FAR, seed=4)
    y = lora_linear(x, w, None, lora_A, lora_B, 2.0, backend="triton")
    got = torch.autograd.grad(y, (x, lora_A, lora_B), dy)
    ref_inputs = [t.detach().float().requires_grad_() for t in (x, lora_A, lora_B)]
    xr, ar, br = ref_inputs
    y_ref = xr @ w.float().T + 2.0 * (xr @ ar.T) @ br.T
    want = torch.autograd.grad(y_ref, ref_inputs, dy.float())
    _assert_close(y, y_ref, "lora_linear y")
    for name, g, r in zip(("dx", "dA", "dB"), got, want):
        _assert_close(g, r, f"lora_linear {name}")


def test_dora_row_norm_weight_past_2_31():
    """‖W + s·B·A‖² per row: W's row offsets (row·K) were int32 (DoRA's row norm, QDoRA's on the decoded W too)."""
    w = _far_weight(0)
    a, b = _randn(16, K, seed=1, scale=0.25), _randn(N_FAR, 16, seed=2, scale=0.25)
    got = dora_row_norm.row_sq_norm(w, a, b, 0.5)
    want = ((w.float() + 0.5 * b.float() @ a.float()) ** 2).sum(1)
    assert float(((got - want).abs() / want).max()) < 3e-2, (got, want)


def _column_cases():
    """(name, run, want) of each launcher taking a column-major (32, N_FAR) operand, columns 32.. past 2**31."""
    h, h2 = _far_columns(32, 0), _far_columns(32, 1)
    d, g = _randn(16, N_FAR, seed=2, scale=0.125), _randn(32, 16, seed=3)
    lo, t = _randn(32, 16, seed=4), _randn(N_FAR, 16, seed=5, scale=0.25)
    hf = h.float()
    return {
        "column_dot": (lambda: column_dot.column_dot(h, h2), lambda: (hf * h2.float()).sum(0)),
        "down_act": (lambda: bottleneck_adapter.down_act(h, d, None, "relu")[1], lambda: hf @ d.float().T),
        "up_residual": (lambda: bottleneck_adapter.up_residual(h, lo, t, None), lambda: hf + lo.float() @ t.float().T),
        "rank_project": (lambda: rank_ops.rank_project(h, d, scale=1.0), lambda: hf @ d.float().T),
        "rank_reduce": (lambda: rank_ops.rank_reduce(g, h), lambda: g.float().T @ hf),
        "rank_reduce_pair": (lambda: rank_ops.rank_reduce_pair(g, h, lo, h)[0], lambda: g.float().T @ hf),
    }


@pytest.mark.parametrize("name", ["column_dot", "down_act", "up_residual", "rank_project", "rank_reduce",
                                  "rank_reduce_pair"])
def test_column_strided_operand(name):
    """Launchers that take any strides: a column index times a column stride was int32 (the ops pass unit column
    strides, as_rows, so this is the launchers' own contract)."""
    run, want = _column_cases()[name]
    _assert_close(run(), want(), name, 1e-5 if name == "column_dot" else 3e-2)


@pytest.mark.parametrize("descriptors", [True, False])
def test_attention_head_stride_past_2_31(descriptors, monkeypatch):
    """The dK/dV kernel's pointer path reached a GQA group's query heads as head g · head stride (int32): past 2**31
    at (group − 1) · S · D ≥ 2**31 in transformers' (B, H, S, D) layout (S ≥ 1.1M tokens at 16 heads a KV head)."""
    from fastft.kernels import attention_bwd, attention_fwd
    from fastft.kernels.attention import UNBOUNDED

    if not descriptors:
        monkeypatch.setattr("fastft.kernels.attention.has_tma", lambda device: False)
    S, D, H = 32, 16, 3  # head h of q/dO at h · 2**30 elements: head 2 passes 2**31
    q, do = (_far((1, S, H, D), (0, D, 2**30, 1), seed, torch.float16) for seed in (0, 1))
    k, v = (_randn(1, S, 1, D, seed=seed).to(torch.float16) for seed in (2, 3))
    o, lse = attention_fwd.attention_forward(q, k, v, sm_scale=0.25, left=UNBOUNDED, right=0)
    qr, kr, vr = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref = torch.nn.functional.scaled_dot_product_attention(
        qr.transpose(1, 2), kr.transpose(1, 2).expand(1, H, S, D), vr.transpose(1, 2).expand(1, H, S, D),
        is_causal=True, scale=0.25).transpose(1, 2)
    want = torch.autograd.grad(ref, (qr, kr, vr), do.float())
    _assert_close(o, ref, "attention o", 1e-2)
    for name, got, w in zip(("dq", "dk", "dv"), attention_bwd.attention_backward(
            do, q, k, v, o, lse, sm_scale=0.25, left=UNBOUNDED, right=0)[:3], want):
        _assert_close(got, w, f"attention {name}", 1e-2)


@pytest.mark.parametrize("descriptors", [True, False])
def test_attention_batch_past_2_31(descriptors, monkeypatch):
    """Guard: sequence b's rows start at b · batch stride in int64 (attention.head_rows, stats_row)."""
    from fastft.ops.attention import flash_attention

    if not descriptors:
        monkeypatch.setattr("fastft.kernels.attention.has_tma", lambda device: False)
    B, S, D = 3, 16, 16  # sequence 2 at 2**31 elements (three sequences: few interpreter programs)
    q, k, v, do = (_far((B, S, 1, D), (2**30, D, D, 1), seed, torch.float16) for seed in range(4))
    inputs = [t.detach().requires_grad_() for t in (q, k, v)]
    out = flash_attention(*inputs, causal=True, backend="triton")
    got = torch.autograd.grad(out, inputs, do)
    refs = [t.detach().float().requires_grad_() for t in (q, k, v)]
    ref = torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in refs),
                                                           is_causal=True).transpose(1, 2)
    want = torch.autograd.grad(ref, refs, do.float())
    _assert_close(out, ref, "attention o", 1e-2)
    for name, g, w in zip(("dq", "dk", "dv"), got, want):
        _assert_close(g, w, f"attention {name}", 1e-2)


def test_loss_rows_past_2_31():
    """Guard: the cross-entropy and KL row kernels' row · stride is int64 (a 16k × 152k logits chunk is 2.5e9)."""
    from fastft.kernels import cross_entropy

    x, t = (_far((N_FAR, K), (STRIDE, 1), seed, torch.float16) for seed in (0, 1))
    labels = torch.randint(0, K, (N_FAR,), generator=torch.Generator().manual_seed(2)).to(DEVICE)
    one = torch.ones(1, device=DEVICE)
    loss = cross_entropy.ce_rows(x, labels, one, ignore_index=-100, label_smoothing=0.0, softcap=None,
                                 compute_grad=False)
    _assert_close(loss, torch.nn.functional.cross_entropy(x.double(), labels, reduction="none"), "ce_rows", 1e-4)
    kl = cross_entropy.kl_rows(x, t, None, one, ignore_index=-100, temperature=1.0, reverse=False,
                               compute_grad=False)
    want = (t.double().softmax(-1) * (t.double().log_softmax(-1) - x.double().log_softmax(-1))).sum(-1)
    _assert_close(kl, want, "kl_rows", 1e-4)


def test_glu_and_rms_norm_rows_past_2_31():
    """Guard: SwiGLU's and RMSNorm's row · stride is int64, forward and backward (131k tokens × 28,672 is 3.8e9)."""
    from fastft.kernels import glu, rms_norm

    gate, up = (_far((N_FAR, K), (STRIDE, 1), seed, torch.float16) for seed in (3, 4))
    _assert_close(glu.glu_forward(gate, up, False), torch.nn.functional.silu(gate.float()) * up.float(), "swiglu",
                  1e-3)
    _, du = glu.glu_backward(up, gate, up, False)
    _assert_close(du, up.float() * torch.nn.functional.silu(gate.float()), "swiglu d_up", 1e-3)

    w = torch.ones(K, device=DEVICE, dtype=torch.float16)
    y, _, rstd = rms_norm.rms_norm_forward(gate, w, 1e-6, 0.0, False, torch.float16)
    g = gate.float().requires_grad_()
    ref = g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + 1e-6)
    _assert_close(y, ref, "rms_norm", 1e-3)
    dx, _ = rms_norm.rms_norm_backward(up, gate, w, rstd, 0.0, None, False)
    _assert_close(dx, torch.autograd.grad(ref, g, up.float())[0], "rms_norm dx", 1e-3)


def test_rope_sequences_past_2_31():
    """Guard: RoPE's batch · stride is int64 (q of 8 × 131k × 64 heads × 128 is 8.6e9)."""
    from fastft.kernels import rope

    D = 16  # q/k (B, S=1, H=1, D) with sequences 32.. past 2**31
    q, k = (_far((N_FAR, 1, 1, D), (STRIDE, D, D, 1), seed, torch.float16) for seed in (5, 6))
    angle = torch.rand(N_FAR, 1, D // 2, generator=torch.Generator().manual_seed(7)).to(DEVICE) * 6
    cos, sin = (torch.cat([f(angle)] * 2, -1) for f in (torch.cos, torch.sin))
    q_out, k_out = torch.empty_like(q), torch.empty_like(k)
    rope.rope_rotate(q, k, cos, sin, q_out, k_out)
    for got, src in ((q_out, q), (k_out, k)):
        s = src.float()
        rotated = torch.cat([-s[..., D // 2:], s[..., :D // 2]], -1)
        _assert_close(got, s * cos[:, :, None] + rotated * sin[:, :, None], "rope", 1e-3)
