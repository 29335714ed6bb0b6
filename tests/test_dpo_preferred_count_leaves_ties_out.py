"""dpo_loss_sum's preferred count is the pairs whose implicit reward prefers the chosen answer: a tie (margin 0, as
at the first step, where the policy is the reference) prefers neither. Mutation run 18: counting ties passed every
test. The loss against fp64 torch."""
import torch
import torch.nn.functional as F

from fastft.apps.training.objectives import dpo_loss_sum


def test_ties_are_not_preferred():
    policy = torch.tensor([-1.0, -2.0, -3.0, -3.0, -2.0, -1.0])  # pairs (chosen, rejected): +, tie, -
    ref = torch.tensor([-1.5, -2.0, -3.0, -3.0, -2.0, -1.5])
    loss, preferred = dpo_loss_sum(policy, ref, 0.1)
    margin = 0.1 * ((policy[0::2] - ref[0::2]) - (policy[1::2] - ref[1::2])).double()
    assert int(preferred) == int((margin > 0).sum())  # the tie and the rejected-preferring pair left out
    torch.testing.assert_close(loss.double(), -F.logsigmoid(margin).sum())
