"""fp16 lm_head LoRA inside the fused losses: dA at a small B.

peft initialises lora_B to 0; after the first optimizer steps |B| ~ lr (1e-4..1e-5). The fused losses' fp16 chunk
loop made u = dlogits·B in fp16 (chunked_logits.Head.grad_hidden) and the dA product uᵀ·h in fp16 shrunk by
2^-ceil(log2 n) (add_product): both fell into fp16's subnormals and dA was 3e-3 (|B| ~ 1e-4) to 3e-2 (1e-5) off
fp64 on both backends, whatever the loss scale, where peft's fp32 adapters give 3e-4.
"""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fastft.ops import lm_head_cross_entropy
from tests.utils import interpreter_only


class _Holder(nn.Module):
    def __init__(self, H, V):
        super().__init__()
        self.lm_head = nn.Linear(H, V, bias=False)


def _head(H, V, r, alpha, b_std, seed):
    import peft

    torch.manual_seed(seed)
    m = _Holder(H, V)
    m.lm_head.weight.data.normal_(0, H ** -0.5)
    m.half()
    model = peft.get_peft_model(m, peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=["lm_head"]))
    head = model.base_model.model.lm_head
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        head.lora_B["default"].weight.copy_(torch.randn(V, r, generator=g) * b_std)
    assert head.lora_A["default"].weight.dtype == torch.float32  # peft's fp32 adapters over an fp16 base
    return head


def _fp64_grads(head, hidden, labels):
    W = head.base_layer.weight.detach().double()
    A = head.lora_A["default"].weight.detach().double().requires_grad_()
    B = head.lora_B["default"].weight.detach().double().requires_grad_()
    h = hidden.double().requires_grad_()
    logits = h @ W.t() + head.scaling["default"] * (h @ A.t()) @ B.t()
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
    return torch.autograd.grad(loss, (h, A, B))


def _rel(a, b):
    assert torch.isfinite(a).all()
    return ((a.double() - b).norm() / b.norm()).item()


@pytest.mark.parametrize("backend", [pytest.param("triton", marks=interpreter_only), "torch"])
@pytest.mark.parametrize("b_std", [1e-4, 1e-5])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_lora_head_fp16_dA_at_small_B(backend, b_std, reduction):
    H, V, r, T = 96, 200, 8, 250  # alpha/r = 0.05
    head = _head(H, V, r, 0.4, b_std, seed=3)
    g = torch.Generator().manual_seed(4)
    hidden = torch.randn(2, T // 2, H, generator=g).half()
    labels = torch.randint(0, V, (2, T // 2), generator=g)
    A, B = head.lora_A["default"].weight, head.lora_B["default"].weight
    h = hidden.clone().requires_grad_()
    loss = lm_head_cross_entropy(h, head, labels, reduction=reduction, backend=backend)
    if reduction == "none":
        loss = loss.sum() / T
    got = torch.autograd.grad(loss * 1024.0, (h, A, B))  # a loss scale: the gradients / 1024 compared
    want = _fp64_grads(head, hidden, labels)
    errs = {n: _rel(a / 1024.0, b) for n, a, b in zip(("dh", "dA", "dB"), got, want)}
    # fp16 rounding: ~4e-4 (peft with its fp32 adapters: 3e-4); before the fix dA was 2.8e-3 / 2.8e-2
    assert errs["dA"] < 1e-3, errs
    assert errs["dh"] < 1e-3 and errs["dB"] < 1e-3, errs


def test_lora_head_fp16_dA_at_zero_B():
    """B = 0 (peft's initial B): dA exactly 0, dh and dB as fp64's."""
    H, V, r, T = 64, 120, 4, 90
    head = _head(H, V, r, 8, 0.0, seed=5)
    g = torch.Generator().manual_seed(6)
    hidden = torch.randn(T, H, generator=g).half()
    labels = torch.randint(0, V, (T,), generator=g)
    A, B = head.lora_A["default"].weight, head.lora_B["default"].weight
    h = hidden.clone().requires_grad_()
    got = torch.autograd.grad(lm_head_cross_entropy(h, head, labels, backend="torch"), (h, A, B))
    want = _fp64_grads(head, hidden, labels)
    assert torch.equal(got[1], torch.zeros_like(got[1]))
    assert _rel(got[0], want[0]) < 1e-3 and _rel(got[2], want[2]) < 1e-3


def test_lora_head_fp16_dA_with_large_row_gradients_does_not_overflow():
    """reduction "none" puts the rows' gradient factor into dlogits (|dlogits row|_1 up to 2·6e4 here): B's fp16
    operand for dA must not be scaled up to ~1 there, or u = dlogits·B' (~1.2e5 here) overflows fp16."""
    H, V, r, T = 64, 16, 4, 40
    head = _head(H, V, r, 4, 1.0, seed=7)
    with torch.no_grad():  # u_j = Σ_v dlogits_v·B_vj with all rows' label 0: 2·(1 - p_0)·1.9e-3·6e4 ≈ 215
        B0 = head.lora_B["default"].weight
        B0.fill_(1.9e-3)
        B0[0].fill_(-1.9e-3)
    g = torch.Generator().manual_seed(8)
    hidden = (torch.randn(T, H, generator=g) * 0.1).half()
    labels = torch.zeros(T, dtype=torch.long)
    A, B = head.lora_A["default"].weight, head.lora_B["default"].weight
    h = hidden.clone().requires_grad_()
    rows = lm_head_cross_entropy(h, head, labels, reduction="none", backend="torch")
    got = torch.autograd.grad(rows, (h, A, B), torch.full_like(rows, 6e4))
    want = [w * T * 6e4 for w in _fp64_grads(head, hidden, labels)]
    for name, a, b in zip(("dh", "dA", "dB"), got, want):
        assert _rel(a, b) < 2e-3, name
