"""rank_project's split-K path (fp32 partials per K split, summed after): the interpreter's only config has
SPLIT_K=1, so without forcing a split config no CPU test runs it; GPU configs use SPLIT_K 2 and 4."""
import pytest
import torch

from fastft.kernels import rank_ops
from fastft.kernels.rank_ops import dropout_mask, rank_project
from tests.utils import interpreter_only


@interpreter_only
@pytest.mark.parametrize("p_drop", [0.0, 0.3])
def test_rank_project_with_k_splits(monkeypatch, p_drop):
    monkeypatch.setattr(rank_ops, "project_configs",
                        lambda *a, **k: [dict(BLOCK_M=32, BLOCK_K=32, SPLIT_K=3, num_warps=4, num_stages=1)])
    g = torch.Generator().manual_seed(0)
    M, K, R, scale, seed = 45, 83 + int(p_drop * 10), 16, 0.7, 1234  # K ragged; 3 splits of 32 columns
    x = torch.randn(M, K, generator=g)
    w = torch.randn(R, K, generator=g)
    got = rank_project(x, w, scale=scale, p_drop=p_drop, seed=seed)
    keep = dropout_mask(seed, M, K, p_drop, x.device) if p_drop else torch.ones(M, K, dtype=torch.bool)
    want = scale * (x.double() * keep) @ w.double().t()
    assert got.dtype == x.dtype and got.shape == (M, R)
    assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-5), (got.double() - want).abs().max()
