"""fp16 dW of the fused losses is summed in fp32 whatever the head's size (weight_grad_dtype): fp16 dlogits stay
unscaled until backward (eager_losses' post_scale), so their sum over all tokens overflows fp16. The suite ran
W's-dtype accumulation (FP32_WEIGHT_GRAD_MIB = 0, a large vocab) only for fp32 / bf16 gradients, where it is safe."""
import torch

from fastft.ops import chunked_logits
from fastft.ops.linear_losses import linear_cross_entropy, linear_cross_entropy_reference
from tests.utils import rel_err


def test_fp16_weight_grad_of_a_large_head_does_not_overflow(monkeypatch):
    monkeypatch.setattr(chunked_logits, "FP32_WEIGHT_GRAD_MIB", 0)  # as for a head too large for an fp32 dW
    torch.manual_seed(0)
    T, H, V = 256, 8, 4
    hidden = (torch.randn(T, H).sign() * 4096).half()  # Σ_t dlogits·h ~ 1.4e5 > 65504 before 1/T
    weight = (torch.randn(V, H) * 1e-4).half().requires_grad_()
    labels = torch.zeros(T, dtype=torch.long)
    loss = linear_cross_entropy(hidden, weight, labels, backend="torch")
    (dW,) = torch.autograd.grad(loss, [weight])
    refs = [t.detach().double().requires_grad_() for t in (hidden, weight)]
    want = torch.autograd.grad(linear_cross_entropy_reference(refs[0], refs[1], labels), refs[1:])
    assert torch.isfinite(dW).all(), "dW overflowed fp16"
    assert rel_err(dW, want[0]) < 5e-3
