"""The rope kernel uses all four table halves (c1, c2, s1, s2) in both directions: with tables whose two halves
differ (transformers' tables repeat one frequency, which hides a swapped half) the Triton output and its
gradient still equal q·cos + rotate_half(q)·sin and its transpose."""
import torch

from fastft.ops import rope, rope_reference
from tests.utils import interpreter_only, rel_err


@interpreter_only
def test_rope_forward_and_backward_with_distinct_table_halves():
    gen = torch.Generator().manual_seed(0)
    B, S, HQ, HK, D = 2, 5, 3, 2, 12
    q = torch.randn(B, HQ, S, D, generator=gen, requires_grad=True)
    k = torch.randn(B, HK, S, D, generator=gen, requires_grad=True)
    cos = torch.randn(B, S, D, generator=gen)  # c1 != c2 and s1 != s2: not a rotation, still a linear map
    sin = torch.randn(B, S, D, generator=gen)
    dq, dk = torch.randn(q.shape, generator=gen), torch.randn(k.shape, generator=gen)
    got = rope(q, k, cos, sin, unsqueeze_dim=1, backend="triton")
    got_grads = torch.autograd.grad(got, (q, k), (dq, dk))
    q64, k64 = (t.detach().double().requires_grad_() for t in (q, k))
    want = rope_reference(q64, k64, cos.double(), sin.double(), unsqueeze_dim=1)
    want_grads = torch.autograd.grad(want, (q64, k64), (dq.double(), dk.double()))
    for g, w, name in zip(got + got_grads, want + want_grads, ("q_out", "k_out", "dq", "dk")):
        assert rel_err(g, w) < 1e-6, name
