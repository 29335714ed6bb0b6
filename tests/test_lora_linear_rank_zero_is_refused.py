"""lora_linear refuses a rank-0 adapter (lora_A of shape (0, K)) naming `lora_A`, as qlora_linear does; without the
check the torch path silently returns the base output (mutation run 18: the check could be dropped)."""
import pytest
import torch

from fastft.ops.lora import lora_linear


def test_lora_linear_rank_zero_is_refused():
    N, K = 8, 16
    with pytest.raises(ValueError, match="`lora_A` must have shape"):
        lora_linear(torch.randn(2, K), torch.randn(N, K), None, torch.randn(0, K), torch.randn(N, 0), 1.0,
                    backend="torch")
