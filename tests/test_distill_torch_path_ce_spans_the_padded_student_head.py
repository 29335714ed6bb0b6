"""distill_loss_sum's torch path (a softcapped or adapted head): with the student's head padded past the shared
tokenizer, the KL terms read the shared vocabulary but the CE term is the student's own loss over its whole head, as
the fused path computes it. Mutation run 18: the torch path's CE over the sliced logits passed every test. Against
plain fp64 torch."""
import torch
import torch.nn.functional as F
from torch import nn

from fastft.apps.training.objectives import distill_loss_sum


def test_ce_over_the_whole_padded_head():
    torch.manual_seed(0)
    T, H, V, pad, cap = 6, 8, 12, 4, 30.0
    hidden, t_hidden = torch.randn(T, H), torch.randn(T, H)
    head, t_head = nn.Linear(H, V + pad, bias=False), nn.Linear(H, V, bias=False)
    targets = torch.randint(0, V, (T,))
    got = distill_loss_sum(hidden, head, t_hidden, t_head, targets, kl_weight=1.0, reverse_kl_weight=0.0,
                           ce_weight=0.5, temperature=1.0, softcap=cap, teacher_softcap=cap)
    s = cap * torch.tanh(F.linear(hidden.double(), head.weight.double()) / cap)
    t = cap * torch.tanh(F.linear(t_hidden.double(), t_head.weight.double()) / cap)
    kl = F.kl_div(F.log_softmax(s[:, :V], -1), F.log_softmax(t, -1), log_target=True, reduction="sum")
    want = kl + 0.5 * F.cross_entropy(s, targets, reduction="sum")
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
