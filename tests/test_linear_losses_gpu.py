"""The fused linear losses on a real GPU (`pytest -m gpu` on the GPU machine): the Triton row kernels natively at
medium shapes, against fp64 references, with the allocator poisoned so unwritten outputs show up as NaN."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastft.ops import (linear_cross_entropy, linear_cross_entropy_reference, linear_distill_loss,
                        linear_distill_loss_reference, linear_kl_div, linear_kl_div_reference,
                        lm_head_cross_entropy)
from tests.utils import rel_err

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("poison_cuda_allocator")]
TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}  # fp32: cuBLAS may use tf32-free fp32


def _leaves(*ts):
    return [t.detach().double().requires_grad_() for t in ts]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_gpu(dtype, reduction):
    T, H, V = 1500, 512, 32003  # T not a multiple of any chunk, V odd
    x = torch.randn(3, T // 3, H, device="cuda").to(dtype).requires_grad_()
    W = (torch.randn(V, H, device="cuda") * H**-0.5 * 3).to(dtype).requires_grad_()
    b = torch.randn(V, device="cuda").to(dtype).requires_grad_()
    y = torch.randint(0, V, (3, T // 3), device="cuda")
    y[:, :50] = -100
    opts = dict(reduction=reduction, label_smoothing=0.1, softcap=20.0)
    if reduction == "mean":
        opts["num_items"] = torch.tensor(2000, device="cuda")
    loss = linear_cross_entropy(x, W, y, bias=b, chunk_size=256, **opts)
    go = torch.rand(loss.shape, device="cuda") + 0.5
    grads = torch.autograd.grad(loss, [x, W, b], go)
    refs = _leaves(x, W, b)
    ref = linear_cross_entropy_reference(refs[0], refs[1], y, bias=refs[2], **opts)
    grads_ref = torch.autograd.grad(ref, refs, go.double())
    assert rel_err(loss, ref) <= TOL[dtype]
    for name, g, r in zip(("x", "W", "b"), grads, grads_ref):
        assert g.dtype == dtype and rel_err(g, r) <= TOL[dtype], name


def test_default_chunk_and_frozen_weight_gpu():
    T, H, V = 4096, 1024, 128256
    x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    W = (torch.randn(V, H, device="cuda") * H**-0.5).to(torch.bfloat16)
    y = torch.randint(0, V, (T,), device="cuda")
    loss = linear_cross_entropy(x, W, y)
    (g,) = torch.autograd.grad(loss, [x])
    (ref_x,) = _leaves(x)
    ref = linear_cross_entropy_reference(ref_x, W.double(), y)
    (g_ref,) = torch.autograd.grad(ref, [ref_x])
    assert rel_err(loss, ref) <= 1e-2 and rel_err(g, g_ref) <= 2e-2


def _student_and_teacher():
    """A bf16 student (hidden, head: gradients wanted) and teacher over a ragged 32003-token vocabulary, labels with
    every fourth ignored."""
    xs = torch.randn(1000, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    Ws = (torch.randn(32003, 256, device="cuda") * 0.06).to(torch.bfloat16).requires_grad_()
    xt = torch.randn(1000, 384, device="cuda", dtype=torch.bfloat16)
    Wt = (torch.randn(32003, 384, device="cuda") * 0.05).to(torch.bfloat16)
    labels = torch.randint(0, 32003, (1000,), device="cuda")
    labels[::4] = -100
    return xs, Ws, xt, Wt, labels


@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_kl_div_gpu(direction):
    xs, Ws, xt, Wt, labels = _student_and_teacher()
    loss = linear_kl_div(xs, Ws, xt, Wt, temperature=2.0, direction=direction, labels=labels, chunk_size=300)
    grads = torch.autograd.grad(loss, [xs, Ws])
    refs = _leaves(xs, Ws)
    ref = linear_kl_div_reference(*refs, xt.double(), Wt.double(), temperature=2.0, direction=direction, labels=labels)
    assert rel_err(loss, ref) <= 2e-2
    for g, r in zip(grads, torch.autograd.grad(ref, refs)):
        assert rel_err(g, r) <= 2e-2


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_distill_loss_gpu(reduction):
    """Every term in one pass (the Triton KL and CE row kernels on copies of one chunk), ragged chunks."""
    xs, Ws, xt, Wt, labels = _student_and_teacher()
    terms = dict(kl_weight=4.0, reverse_kl_weight=2.0, ce_weight=0.5, temperature=2.0, reduction=reduction)
    loss = linear_distill_loss(xs, Ws, xt, Wt, labels, chunk_size=300, **terms)
    go = torch.rand_like(loss) + 0.5
    grads = torch.autograd.grad(loss, [xs, Ws], go)
    refs = _leaves(xs, Ws)
    ref = linear_distill_loss_reference(*refs, xt.double(), Wt.double(), labels, **terms)
    assert rel_err(loss, ref) <= 2e-2
    for g, r in zip(grads, torch.autograd.grad(ref, refs, go.double())):
        assert rel_err(g, r) <= 2e-2


def test_lora_and_nf4_lm_heads_gpu():
    import peft

    import fastft
    from fastft.modules.nf4_linear import NF4Linear

    class Holder(nn.Module):
        def __init__(self, head):
            super().__init__()
            self.lm_head = head

    H, V = 512, 32003
    for quantized in (False, True):
        # with a bias: an NF4Linear without one has no parameters, which peft.get_peft_model cannot place
        linear = nn.Linear(H, V, device="cuda", dtype=torch.bfloat16)
        base = NF4Linear.from_linear(linear) if quantized else linear
        model = fastft.get_peft_model(Holder(base), peft.LoraConfig(r=8, lora_alpha=16, target_modules=["lm_head"]))
        head = model.base_model.model.lm_head
        nn.init.normal_(head.lora_B["default"].weight, std=0.05)
        A, B = head.lora_A["default"].weight, head.lora_B["default"].weight
        x = torch.randn(777, H, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        y = torch.randint(0, V, (777,), device="cuda")
        loss = lm_head_cross_entropy(x, head, y)
        grads = torch.autograd.grad(loss, [x, A, B])
        ref = F.cross_entropy(head(x).float(), y)
        grads_ref = torch.autograd.grad(ref, [x, A, B])
        assert rel_err(loss, ref) <= 1e-2
        for name, g, r in zip(("x", "A", "B"), grads, grads_ref):
            assert rel_err(g, r) <= 3e-2, (quantized, name)
