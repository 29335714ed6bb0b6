"""dora_linear refuses dropout_p = 1 (the doc and the check say [0, 1)): accepted, the torch path drops the whole
adapter (y = the base output, A/B/m get zero gradient) without a word. And dora_linear_reference's public keep_mask=
path is inverted dropout: x_d = x·keep/(1 − p) (nothing tested that division)."""
import pytest
import torch
import torch.nn.functional as F

from fastft.ops.dora import dora_linear, dora_linear_reference


def _args(seed=0, M=6, K=12, N=10, r=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g, dtype=torch.float64)
    W = torch.randn(N, K, generator=g, dtype=torch.float64)
    b = torch.randn(N, generator=g, dtype=torch.float64)
    A = torch.randn(r, K, generator=g, dtype=torch.float64)
    B = torch.randn(N, r, generator=g, dtype=torch.float64)
    m = torch.rand(N, generator=g, dtype=torch.float64) + 0.5
    return x, W, b, A, B, m


@pytest.mark.parametrize("p", [1.0, 1.5, -0.1])
def test_dora_dropout_outside_0_1_is_refused(p):
    x, W, b, A, B, m = _args()
    with pytest.raises(ValueError, match="dropout_p"):
        dora_linear(x, W, b, A, B, m, 0.5, p, backend="torch")


def test_dora_reference_keep_mask_is_inverted_dropout():
    x, W, b, A, B, m = _args()
    s, p = 0.5, 0.25
    keep = torch.rand(x.shape, generator=torch.Generator().manual_seed(1)) > p
    got = dora_linear_reference(x, W, b, A, B, m, s, p, keep_mask=keep)
    sigma = m / torch.linalg.norm(W + s * B @ A, dim=1)
    x_d = x * keep / (1 - p)
    want = F.linear(x, W, b) + (sigma - 1) * F.linear(x_d, W) + sigma * s * F.linear(F.linear(x_d, A), B)
    torch.testing.assert_close(got, want)
