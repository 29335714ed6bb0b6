"""objectives.distill_loss_sum against its definition, on both paths: Σ over target rows of
kl·T²·KL(teacher‖student) + rkl·T²·KL(student‖teacher) + ce·CE(student, labels). Rows whose target is ignored
(a bucketed batch's padding rows) add nothing, and a student head padded past the teacher's rows takes its CE over
its whole head while the KL terms cover the shared vocabulary."""
import torch
import torch.nn.functional as F
from torch import nn

from fastft.apps.training.objectives import distill_loss_sum

IGNORE = -100


def _reference(hidden, head, t_hidden, t_head, targets, kl, rkl, ce, T, softcap=None):
    def logits(h, w):
        z = h.double() @ w.double().t()
        return z if softcap is None else softcap * torch.tanh(z / softcap)

    s_full, t = logits(hidden, head.weight), logits(t_hidden, t_head.weight)
    vocab = min(s_full.shape[-1], t.shape[-1])
    s, t = s_full[:, :vocab], t[:, :vocab]
    keep = targets != IGNORE
    s_log, t_log = F.log_softmax(s / T, -1), F.log_softmax(t / T, -1)
    fwd = (t_log.exp() * (t_log - s_log)).sum(-1)
    rev = (s_log.exp() * (s_log - t_log)).sum(-1)
    loss = (kl * T**2 * fwd[keep]).sum() + (rkl * T**2 * rev[keep]).sum()
    return loss + ce * F.cross_entropy(s_full, targets, reduction="sum", ignore_index=IGNORE)


def _heads(vocab_student, vocab_teacher, hidden=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    student, teacher = nn.Linear(hidden, vocab_student, bias=False), nn.Linear(hidden, vocab_teacher, bias=False)
    with torch.no_grad():
        student.weight.copy_(torch.randn(vocab_student, hidden, generator=g))
        teacher.weight.copy_(torch.randn(vocab_teacher, hidden, generator=g))
    return student, teacher, g


def test_ignored_rows_add_nothing_on_the_torch_path():
    student, teacher, g = _heads(32, 32)
    hidden, t_hidden = torch.randn(6, 16, generator=g), torch.randn(6, 16, generator=g)
    targets = torch.tensor([3, IGNORE, 7, IGNORE, 1, 30])
    kw = dict(kl_weight=1.0, reverse_kl_weight=0.5, ce_weight=0.0, temperature=2.0, softcap=20.0,
              teacher_softcap=20.0)  # softcapped heads: the torch form
    got = distill_loss_sum(hidden, student, t_hidden, teacher, targets, **kw)
    want = _reference(hidden, student, t_hidden, teacher, targets, 1.0, 0.5, 0.0, 2.0, softcap=20.0)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)
    keep = targets != IGNORE  # the same as the counted rows alone
    alone = distill_loss_sum(hidden[keep], student, t_hidden[keep], teacher, targets[keep], **kw)
    torch.testing.assert_close(got, alone, rtol=1e-5, atol=1e-5)


def test_padded_student_head_takes_its_ce_over_the_whole_head_on_the_fused_path():
    student, teacher, g = _heads(40, 32)  # the student's head padded by 8 rows past the shared 32
    with torch.no_grad():
        student.weight[32:] *= 3.0  # padding rows with large logits: a CE over the shared rows alone differs
    hidden, t_hidden = torch.randn(5, 16, generator=g), torch.randn(5, 16, generator=g)
    targets = torch.tensor([3, IGNORE, 7, 0, 31])
    got = distill_loss_sum(hidden, student, t_hidden, teacher, targets, kl_weight=1.0, reverse_kl_weight=0.0,
                           ce_weight=0.5, temperature=1.0)
    want = _reference(hidden, student, t_hidden, teacher, targets, 1.0, 0.0, 0.5, 1.0)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)
