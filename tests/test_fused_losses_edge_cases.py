"""Fused-loss edge cases a fuzz audit found silently wrong (2026-12-06):
- an empty batch (no target rows, e.g. a micro-batch without assistant tokens) with a head whose dW is accumulated
  in its own dtype (bf16 heads of 64M+ elements) returned the uninitialised dW buffer: NaN / 1e38 gradients;
- a peft LoRA lm_head merged and then disabled (a DPO reference pass) still counted the merged delta (peft's
  forward unmerges first);
- an nn.Linear subclass with its own forward was read as x·Wᵀ + b, its forward skipped;
- fp64 inputs under torch.autocast were cast to bf16 (torch's ops and fastft's other ops leave fp64 alone);
and the loud ones: bools taken as numbers, DPO's label dtype error naming the wrong argument."""
import peft
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastft.apps.training.objectives import token_cross_entropy_sum
from fastft.ops import chunked_logits
from fastft.ops.linear_losses import (linear_cross_entropy, linear_dpo_loss, linear_kl_div, lm_head_cross_entropy)

V, H = 37, 16


@pytest.fixture
def poisoned_dw_buffer(monkeypatch):
    """dW accumulated in W's dtype (as for a large bf16 head), its uninitialised buffer filled with NaN: every
    element must be written."""
    monkeypatch.setattr(chunked_logits, "FP32_WEIGHT_GRAD_MIB", 0)
    make = chunked_logits._weight_grad_buffer
    monkeypatch.setattr(chunked_logits, "_weight_grad_buffer", lambda w: make(w).fill_(float("nan")))


@pytest.mark.parametrize("op, reduction", [("ce", "mean"), ("ce", "sum"), ("ce", "none"), ("kl", "mean"),
                                           ("objective", "sum")])
@pytest.mark.parametrize("T", [0, 5])
def test_dw_is_written_whole_for_empty_and_full_batches(poisoned_dw_buffer, op, reduction, T):
    torch.manual_seed(0)
    W = torch.randn(V, H, dtype=torch.bfloat16, requires_grad=True)
    h = torch.randn(T, H, dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, V, (T,))
    if op == "ce":
        loss = linear_cross_entropy(h, W, labels, reduction=reduction, backend="torch")
    elif op == "kl":
        loss = linear_kl_div(h, W, torch.randn(T, 5, dtype=torch.bfloat16), torch.randn(V, 5, dtype=torch.bfloat16),
                             reduction=reduction, backend="torch")
    else:
        head = nn.Linear(H, V, bias=False).to(torch.bfloat16)
        head.weight = nn.Parameter(W.detach())
        W = head.weight
        loss = token_cross_entropy_sum(h, head, labels)
    loss.sum().backward()
    assert torch.equal(W.grad, torch.zeros_like(W)) if T == 0 else torch.isfinite(W.grad).all()


def test_a_merged_then_disabled_lora_head_is_the_bare_base():
    class Holder(nn.Module):
        def __init__(self):
            super().__init__()
            self.lm_head = nn.Linear(24, 53)

    torch.manual_seed(0)
    model = peft.get_peft_model(Holder(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["lm_head"]))
    head = model.base_model.model.lm_head
    with torch.no_grad():
        head.lora_B["default"].weight.normal_(std=0.5)
    hidden, labels = torch.randn(3, 7, 24), torch.randint(0, 53, (3, 7))
    with torch.no_grad():
        bare = F.cross_entropy(head.base_layer(hidden).reshape(-1, 53), labels.reshape(-1))
        model.merge_adapter()
        with model.disable_adapter():
            fused = lm_head_cross_entropy(hidden, head, labels)  # before peft's own forward would unmerge
            peft_loss = F.cross_entropy(head(hidden).reshape(-1, 53), labels.reshape(-1))
    torch.testing.assert_close(fused, peft_loss)
    torch.testing.assert_close(fused, bare)


def test_a_linear_subclass_with_its_own_forward_is_called_not_read():
    class HalfLogits(nn.Linear):
        def forward(self, x):
            return super().forward(x) * 0.5

    torch.manual_seed(0)
    head = HalfLogits(H, V)
    hidden, labels = torch.randn(7, H) * 3, torch.randint(0, V, (7,))
    with pytest.raises(TypeError, match="HalfLogits"):
        lm_head_cross_entropy(hidden, head, labels)
    with pytest.warns(UserWarning, match="unfused"), torch.no_grad():
        got = token_cross_entropy_sum(hidden, head, labels)  # the objective falls back to calling the head
    torch.testing.assert_close(got, F.cross_entropy(head(hidden), labels, reduction="sum"))


def test_fp64_stays_fp64_under_autocast():
    """(The loss itself is fp32 for every input dtype, as documented; what autocast changed was the compute.)"""
    torch.manual_seed(0)
    h = torch.randn(9, 32, dtype=torch.float64, requires_grad=True)
    W = torch.randn(V, 32, dtype=torch.float64) * 0.5
    labels = torch.randint(0, V, (9,))
    ht, Wt = torch.randn(9, 8, dtype=torch.float64), torch.randn(V, 8, dtype=torch.float64)

    def losses():
        ce = linear_cross_entropy(h, W, labels, backend="torch")
        return ce, linear_kl_div(h, W, ht, Wt, backend="torch"), torch.autograd.grad(ce, h)[0]
    want = losses()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = losses()
    assert got[2].dtype == torch.float64
    for a, b in zip(got, want):
        assert torch.equal(a, b)


@pytest.mark.parametrize("option", ["label_smoothing", "temperature", "beta"])
def test_bools_are_not_numbers(option):
    h, W, labels = torch.randn(4, H), torch.randn(V, H), torch.randint(0, V, (4,))
    with pytest.raises(ValueError, match=f"`{option}`"):
        if option == "label_smoothing":
            linear_cross_entropy(h, W, labels, label_smoothing=True)
        elif option == "temperature":
            linear_kl_div(h, W, torch.randn(4, 5), torch.randn(V, 5), temperature=True)
        else:
            linear_dpo_loss(h[None], h[None], W, labels[None], labels[None], ref_chosen_logps=torch.zeros(1),
                            ref_rejected_logps=torch.zeros(1), beta=True)


def test_dpo_names_the_label_argument_of_the_wrong_dtype():
    h, W, labels = torch.randn(1, 4, H), torch.randn(V, H), torch.randint(0, V, (1, 4))
    with pytest.raises(ValueError, match="`chosen_labels` must be int64"):
        linear_dpo_loss(h, h, W, labels.float(), labels, ref_chosen_logps=torch.zeros(1),
                        ref_rejected_logps=torch.zeros(1))
