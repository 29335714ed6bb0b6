"""qlora_linear refuses a rank-0 adapter (lora_A of shape (0, K)), as its check says; without it the torch path
silently returns the base output."""
import pytest
import torch

from fastft.ops.qlora import qlora_linear
from fastft.quant.nf4_weight import quantize_nf4


def test_qlora_rank_zero_is_refused():
    N, K = 8, 64
    qw = quantize_nf4(torch.randn(N, K), blocksize=64)
    with pytest.raises(ValueError, match="lora_A"):
        qlora_linear(torch.randn(2, K), qw, None, torch.randn(0, K), torch.randn(N, 0), 1.0, backend="torch")
