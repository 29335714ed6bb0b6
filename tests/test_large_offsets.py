"""Kernels address tensors past 2**31 elements: a row index times its row stride is computed in int64.

At scale (Qwen2.5-7B's 18,944-wide MLP at 113k tokens a call, Llama-3-70B's at 75k) `row * stride` passes 2**31;
in int32 it wrapped and read (or wrote) up to 4 GB before the tensor: silently wrong LoRA outputs and gradients.
Tested without such tensors: a (40, 64) view with row stride 2**26 placed 2**31 elements into a buffer that is
never touched there (the pages cost nothing), so rows 32..39 lie past 2**31 and a wrapped offset reads zeros."""
import pytest
import torch

from fastft.kernels import bottleneck_adapter, column_dot, lora_gemm, nf4_gemm, rank_ops
from fastft.kernels.attention import MAX_GRID_YZ, grid_rows
from fastft.kernels.nf4_dequant import nf4_dequantize

pytestmark = pytest.mark.anydevice  # the GPU script runs it on CUDA too

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
M, K, STRIDE = 40, 64, 2**26  # rows 32.. start past 2**31 elements


def _far_rows(seed: int) -> torch.Tensor:
    """(M, K) bf16 of random values with row stride STRIDE, 2**31 elements into an untouched buffer (where an
    offset wrapped by 2**32 lands: zeros on the GPU, untouched pages on the CPU; no fault either way)."""
    size = 2**31 + (M - 1) * STRIDE + K
    buffer = torch.zeros(size, dtype=torch.bfloat16, device=DEVICE) if DEVICE.type == "cuda" \
        else torch.empty(size, dtype=torch.bfloat16)  # lazily committed: only the rows' pages are touched
    x = buffer.as_strided((M, K), (STRIDE, 1), 2**31)
    x.copy_(torch.randn(M, K, generator=torch.Generator().manual_seed(seed)).to(x.dtype))
    return x


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
