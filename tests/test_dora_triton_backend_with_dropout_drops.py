"""dora_linear(backend="triton") with dropout_p > 0 must apply the dropout (the fused kernels take none, so the call
goes to the reference path): the same draw as dora_linear_reference under the same seed. Mutation run 18: sending
it to the fused kernels, which silently ran without dropout, passed every test."""
import torch

from fastft.ops.dora import dora_linear, dora_linear_reference
from tests.utils import assert_close, interpreter_only


@interpreter_only
def test_triton_backend_dropout_matches_the_reference_draw():
    g = torch.Generator().manual_seed(0)
    M, K, N, r, p, s = 8, 32, 16, 4, 0.5, 0.5
    x = torch.randn(M, K, generator=g)
    W = torch.randn(N, K, generator=g) / K ** 0.5
    A = torch.randn(r, K, generator=g) / K ** 0.5
    B = torch.randn(N, r, generator=g)
    m = torch.rand(N, generator=g) + 0.5

    torch.manual_seed(1)
    got = dora_linear(x, W, None, A, B, m, s, p, backend="triton")
    torch.manual_seed(1)
    want = dora_linear_reference(x.double(), W.double(), None, A.double(), B.double(), m.double(), s, p)
    assert_close(got, want, torch.float32, "y with dropout")
