"""labels must have hidden's leading shape exactly: a (S, B) labels tensor for (B, S, H) hidden states (or a flat one)
has the right number of elements but pairs rows with the wrong labels."""
import pytest
import torch

from fastft.ops.linear_losses import linear_cross_entropy, linear_kl_div


@pytest.mark.parametrize("shape", [(3, 2), (6,), (1, 6)])
def test_labels_of_another_shape_with_the_same_count_are_refused(shape):
    hidden, weight = torch.randn(2, 3, 8), torch.randn(11, 8)
    labels = torch.randint(0, 11, shape)
    with pytest.raises(ValueError, match=r"linear_cross_entropy: `labels` has shape"):
        linear_cross_entropy(hidden, weight, labels, backend="torch")
    with pytest.raises(ValueError, match=r"linear_kl_div: `labels` has shape"):
        linear_kl_div(hidden, weight, torch.randn(2, 3, 5), torch.randn(11, 5), labels=labels, backend="torch")
