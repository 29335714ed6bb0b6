"""The eager fused losses make their gradients in the forward; backward hands them out unscaled only when the
incoming gradient is exactly 1 (_unit_gradient). A backward of -loss (grad_output -1: a maximised objective,
`(-loss).backward()`) must still flip their sign. The fuzz tests' scalar grad_outputs (1, 0.5, -3) never hit -1."""
import pytest
import torch

from fastft.ops.linear_losses import linear_cross_entropy, linear_cross_entropy_reference
from tests.utils import rel_err


@pytest.mark.parametrize("go", [1.0, -1.0, 0.5])
@pytest.mark.parametrize("trainable_weight", [True, False])
def test_eager_loss_gradients_follow_grad_output_sign(go, trainable_weight):
    torch.manual_seed(0)
    T, H, V = 12, 16, 29
    hidden = torch.randn(T, H, requires_grad=True)
    weight = (torch.randn(V, H) * H ** -0.5).requires_grad_(trainable_weight)
    labels = torch.randint(0, V, (T,))
    inputs = [hidden, weight] if trainable_weight else [hidden]
    loss = linear_cross_entropy(hidden, weight, labels, backend="torch")
    got = torch.autograd.grad(loss * go, inputs)  # loss * -1.0: grad_output -1 reaches the op's backward
    refs = [t.detach().double().requires_grad_(t.requires_grad) for t in (hidden, weight)]
    ref_loss = linear_cross_entropy_reference(refs[0], refs[1], labels)
    want = torch.autograd.grad(ref_loss * go, refs[:len(inputs)])
    for a, b in zip(got, want):
        assert rel_err(a, b) < 1e-5
