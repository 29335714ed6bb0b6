"""flash_attention refuses dense q/k of no positions (the torch path would return zeros for rows that see nothing)
and softmax_scale=0 (every key weighted alike: a silent uniform average), with a ValueError naming the argument."""
import pytest
import torch

from fastft.ops import flash_attention


@pytest.mark.parametrize("n_q,n_k", [(4, 0), (0, 4)])
def test_no_positions_are_refused(n_q, n_k):
    q = torch.randn(2, n_q, 4, 64)
    k, v = torch.randn(2, n_k, 2, 64), torch.randn(2, n_k, 2, 64)
    with pytest.raises(ValueError, match=r"`q` and `k` need at least one position each"):
        flash_attention(q, k, v, backend="torch")


def test_zero_softmax_scale_is_refused():
    q, k, v = torch.randn(2, 8, 4, 64), torch.randn(2, 8, 2, 64), torch.randn(2, 8, 2, 64)
    with pytest.raises(ValueError, match=r"`softmax_scale` must be a positive finite number"):
        flash_attention(q, k, v, softmax_scale=0.0, backend="torch")
