"""qlora_linear(backend="torch") applies dropout_p to the LoRA input: the same draw as qlora_linear_reference from
the same generator state. Passing 0 there instead (dropout silently off on the torch backend, the CPU default) passed
every test: the torch-backend tests ran dropout 0 only."""
import torch

from fastft.ops.qlora import qlora_linear, qlora_linear_reference
from fastft.quant.nf4_weight import quantize_nf4


def test_qlora_torch_backend_applies_dropout():
    g = torch.Generator().manual_seed(0)
    M, K, N, r, s, p = 16, 64, 24, 4, 2.0, 0.5
    x = torch.randn(M, K, generator=g)
    qw = quantize_nf4(torch.randn(N, K, generator=g), blocksize=64)
    A = torch.randn(r, K, generator=g)
    B = torch.randn(N, r, generator=g)
    torch.manual_seed(123)
    got = qlora_linear(x, qw, None, A, B, s, p, backend="torch")
    torch.manual_seed(123)
    want = qlora_linear_reference(x, qw, None, A, B, s, p)
    torch.testing.assert_close(got, want)
    no_dropout = qlora_linear(x, qw, None, A, B, s, 0.0, backend="torch")
    assert (got - no_dropout).abs().max() > 1e-3  # dropout changed the LoRA term
