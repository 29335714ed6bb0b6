"""fastft.ops.linear_distill_loss: several distillation terms (forward KL, reverse KL, CE on the labels) in one
chunked pass over the heads, against an fp64 reference, against the per-term ops, and in fastft train's objective
(one pass where it made one per term)."""
import random

import pytest
import torch

from fastft.ops import (linear_cross_entropy, linear_distill_loss, linear_distill_loss_reference, linear_kl_div)
from tests.utils import TOL, interpreter_only, rel_err

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TERMS = [dict(kl_weight=0.7, reverse_kl_weight=0.4), dict(reverse_kl_weight=1.0, ce_weight=0.3),
         dict(kl_weight=2.0, reverse_kl_weight=0.5, ce_weight=0.25), dict(kl_weight=0.0, ce_weight=1.0),
         dict(kl_weight=1.5)]


def _leaf(t, dtype=None):
    return t.detach().to(dtype or t.dtype).requires_grad_()


def _case(seed, dtype, T, V, Hs=16, Ht=24):
    g = torch.Generator().manual_seed(seed)
    hs = _leaf(torch.randn(T, Hs, generator=g).to(dtype))
    ws = _leaf((torch.randn(V, Hs, generator=g) * 0.5).to(dtype))
    ht, wt = torch.randn(T, Ht, generator=g).to(dtype), (torch.randn(V, Ht, generator=g) * 0.5).to(dtype)
    labels = torch.randint(0, V, (T,), generator=g)
    labels[::3] = -100
    return hs, ws, ht, wt, labels


@pytest.mark.parametrize("seed", range(10))
def test_distill_loss_matches_fp64_reference(seed):
    rnd = random.Random(seed)
    dtype = DTYPES[seed % 3]
    T, V = rnd.randint(1, 40), rnd.choice([7, 101])
    hs, ws, ht, wt, labels = _case(seed, dtype, T, V)
    opts = dict(temperature=rnd.choice([1.0, 2.0]), reduction=rnd.choice(["mean", "sum", "none"]),
                **TERMS[seed % len(TERMS)])
    if opts["reduction"] == "mean" and rnd.random() < 0.4:
        opts["num_items"] = 11
    loss = linear_distill_loss(hs, ws, ht, wt, labels, backend="torch", chunk_size=rnd.choice([3, 16]), **opts)
    refs = [_leaf(hs, torch.float64), _leaf(ws, torch.float64)]
    want = linear_distill_loss_reference(refs[0], refs[1], ht.double(), wt.double(), labels, **opts)
    assert rel_err(loss, want) <= TOL[dtype] * 2
    go = torch.rand(loss.shape, dtype=torch.float64) + 0.5
    got_grads = torch.autograd.grad(loss, (hs, ws), go.float())
    for name, got, ref in zip(("student_hidden", "student_weight"), got_grads, torch.autograd.grad(want, refs, go)):
        assert rel_err(got, ref) <= TOL[dtype] * 4, name


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=interpreter_only)])
def test_distill_loss_is_the_sum_of_its_terms(backend):
    """One pass equals the per-term ops it replaces (loss and gradients), ragged chunks, ignored rows."""
    hs, ws, ht, wt, labels = _case(3, torch.float32, 19, 101)
    hs = _leaf(hs.view(1, 19, 16))
    loss = linear_distill_loss(hs, ws, ht.view(1, 19, 24), wt, labels.view(1, 19), kl_weight=0.6,
                               reverse_kl_weight=0.3, ce_weight=0.2, temperature=1.5, backend=backend, chunk_size=8)
    got = torch.autograd.grad(loss, (hs, ws))
    kl = dict(labels=labels.view(1, 19), temperature=1.5, backend=backend, chunk_size=8)
    want = (0.6 * linear_kl_div(hs, ws, ht.view(1, 19, 24), wt, direction="forward", **kl)
            + 0.3 * linear_kl_div(hs, ws, ht.view(1, 19, 24), wt, direction="reverse", **kl)
            + 0.2 * linear_cross_entropy(hs, ws, labels.view(1, 19), backend=backend, chunk_size=8))
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)
    for a, b in zip(got, torch.autograd.grad(want, (hs, ws))):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_small_weights_keep_fp16_gradients():
    """fp16 chunk gradients stay unscaled until backward (1/N would sink them below fp16's range); small term weights
    folded into the chunks sank them the same way (dW 4.9e-2 off fp64 at weights 1e-3, V=8192; the per-term ops,
    weighted in fp32 after, 2.5e-3): the chunks take the weights relative to the largest."""
    g = torch.Generator().manual_seed(0)
    T, H, V = 32, 64, 8192
    hs = torch.randn(T, H, generator=g).half().requires_grad_()
    ws = (torch.randn(V, H, generator=g) * 0.3).half().requires_grad_()
    ht, wt = torch.randn(T, H, generator=g).half(), (torch.randn(V, H, generator=g) * 0.3).half()
    labels = torch.randint(0, V, (T,), generator=g)
    weights = dict(kl_weight=2e-3, reverse_kl_weight=1e-3, ce_weight=5e-4)
    loss = linear_distill_loss(hs, ws, ht, wt, labels, reduction="sum", backend="torch", **weights)
    refs = [_leaf(hs, torch.float64), _leaf(ws, torch.float64)]
    want = linear_distill_loss_reference(refs[0], refs[1], ht.double(), wt.double(), labels, reduction="sum",
                                         **weights)
    assert rel_err(loss, want) <= 1e-3
    for got, ref in zip(torch.autograd.grad(loss, (hs, ws)), torch.autograd.grad(want, refs)):
        assert rel_err(got, ref) <= 5e-3


def test_bad_distill_input_names_the_argument():
    h, w, y = torch.randn(3, 8), torch.randn(13, 8), torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match="reverse_kl_weight.*≥ 0.*-1"):
        linear_distill_loss(h, w, h, w, y, reverse_kl_weight=-1.0)
    with pytest.raises(ValueError, match="kl_weight.*inf"):
        linear_distill_loss(h, w, h, w, y, kl_weight=float("inf"))
    with pytest.raises(ValueError, match="every weight is 0"):
        linear_distill_loss(h, w, h, w, y, kl_weight=0.0)
    with pytest.raises(ValueError, match="ce_weight=0.5 needs `labels`"):
        linear_distill_loss(h, w, h, w, ce_weight=0.5)
    with pytest.raises(ValueError, match="temperature"):
        linear_distill_loss(h, w, h, w, y, temperature=0.0)


def test_distillation_objective_makes_one_pass_for_all_its_terms(monkeypatch):
    """fastft train's distill with --reverse-kl-weight and --ce-weight beside --kl-weight ran one fused pass per
    term (each made the chunk's logits, dh and, with a trainable head, its own dW: +2 GiB at 8B full fine-tuning,
    8 instead of 3 T x V x H GEMMs); now one. A padded student head keeps its CE apart (over the whole head)."""
    from fastft.apps.training import objectives
    from fastft.ops import chunked_logits

    passes = []
    run_chunks = chunked_logits.run_chunks
    monkeypatch.setattr(chunked_logits, "run_chunks", lambda *a, **k: (passes.append(1), run_chunks(*a, **k))[1])
    g = torch.Generator().manual_seed(0)
    hidden, t_hidden = torch.randn(9, 16, generator=g).requires_grad_(), torch.randn(9, 24, generator=g)
    targets = torch.randint(0, 100, (9,), generator=g)
    knobs = dict(kl_weight=1.0, reverse_kl_weight=0.5, ce_weight=0.25, temperature=2.0)
    for student_rows, want_passes in ((100, 1), (104, 2)):
        passes.clear()
        head = torch.nn.Linear(16, student_rows, bias=False)
        loss = objectives.distill_loss_sum(hidden, head, t_hidden, torch.nn.Linear(24, 100, bias=False), targets,
                                           **knobs)
        loss.backward()
        assert len(passes) == want_passes, student_rows


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=interpreter_only)])
def test_ce_alone_makes_no_teacher_logits(backend, monkeypatch):
    """ce_weight alone made the teacher's logits of every chunk (a T x V x Ht GEMM and a chunk buffer) for
    nothing: now the pass equals linear_cross_entropy's and reads no teacher row."""
    from fastft.ops import chunked_logits

    hs, ws, ht, wt, labels = _case(5, torch.float32, 13, 101)
    made = []
    real = chunked_logits.RowLoss.row_fn

    def row_fn(self, labels2, teacher_h2=None, teacher_w=None):
        class Watched(torch.Tensor):  # any use of the teacher's rows is recorded
            @classmethod
            def __torch_function__(cls, func, types, args=(), kwargs=None):
                made.append(func)
                return super().__torch_function__(func, types, args, kwargs or {})
        watched = None if teacher_h2 is None else teacher_h2.as_subclass(Watched)
        return real(self, labels2, watched, teacher_w)

    monkeypatch.setattr(chunked_logits.RowLoss, "row_fn", row_fn)
    loss = linear_distill_loss(hs, ws, ht, wt, labels, kl_weight=0.0, ce_weight=0.5, backend=backend, chunk_size=4)
    want = 0.5 * linear_cross_entropy(hs, ws, labels, backend=backend, chunk_size=4)
    torch.testing.assert_close(loss, want, rtol=1e-6, atol=1e-7)
    for a, b in zip(torch.autograd.grad(loss, (hs, ws)), torch.autograd.grad(want, (hs, ws))):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert made == []
    linear_distill_loss(hs, ws, ht, wt, labels, kl_weight=0.1, ce_weight=0.5, backend=backend, chunk_size=4)
    assert made  # the watch sees the teacher's rows when a KL term is weighted
