"""linear_kl_div / linear_distill_loss with reduction "mean" and no labels divide by the row count, at least 1
(_grad_scale's max(tokens, 1)): an empty batch is 0 with zero gradients, the losses' documented rule, not NaN.
(test_all_ignored_and_empty covers the count of labels; without labels the row count went untested.)"""
import pytest
import torch

from fastft.ops import linear_distill_loss, linear_kl_div


@pytest.mark.parametrize("loss_fn", [linear_kl_div, linear_distill_loss])
def test_an_empty_batch_without_labels_is_zero(loss_fn):
    g = torch.Generator().manual_seed(0)
    hs = torch.randn(0, 16, requires_grad=True)
    ht = torch.randn(0, 16)
    Ws = torch.randn(32, 16, generator=g, requires_grad=True)
    Wt = torch.randn(32, 16, generator=g)
    loss = loss_fn(hs, Ws, ht, Wt, backend="torch")
    loss.backward()
    assert float(loss) == 0.0
    assert torch.count_nonzero(Ws.grad) == 0
