"""Distillation softcaps the teacher's logits with the teacher's own final_logit_softcapping (Gemma 2/3): a model
distilled from an identical copy of itself has zero KL in either direction, and a cap on the teacher alone moves
the loss."""
import pytest
import torch

from fastft.apps.training.data import Example, pack
from fastft.apps.training.objectives import ObjectiveModel
from tests.test_train_objectives import _tiny_gemma2

IGNORE = -100


def _batch():
    docs = []
    for n, start in ((12, 5), (9, 40)):
        ids = [(start + 7 * i) % 120 + 3 for i in range(n)]
        docs.append(Example(ids, [IGNORE] * 3 + ids[3:]))
    return pack(docs, pad_token_id=0, flash_kwargs=False)


@pytest.mark.parametrize("weights", [dict(kl_weight=1.0), dict(kl_weight=0.0, reverse_kl_weight=1.0)])
def test_distilling_from_an_identical_softcapped_teacher_is_zero(weights):
    batch = _batch()
    objective = ObjectiveModel(_tiny_gemma2(5.0), "distill", teacher=_tiny_gemma2(5.0), ce_weight=0.0,
                               temperature=2.0, **weights).eval()
    with torch.no_grad():
        loss, _ = objective(batch)
    assert abs(float(loss)) < 1e-4


def test_a_cap_on_the_teacher_alone_changes_the_loss():
    batch = _batch()
    with torch.no_grad():
        same, _ = ObjectiveModel(_tiny_gemma2(None), "distill", teacher=_tiny_gemma2(None)).eval()(batch)
        capped, _ = ObjectiveModel(_tiny_gemma2(None), "distill", teacher=_tiny_gemma2(5.0)).eval()(batch)
    assert abs(float(same)) < 1e-4 and float(capped) > 1e-2
