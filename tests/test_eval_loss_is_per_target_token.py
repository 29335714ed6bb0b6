"""fastft train's held-out loss: summed over every target token of every record, divided by their number (not by
the number of records)."""
import torch
import torch.nn.functional as F

from fastft.apps.training.data import Example, pack
from fastft.apps.training.evaluation import evaluate
from fastft.apps.training.objectives import ObjectiveModel
from tests.utils import tiny_llama


def test_eval_loss_is_the_mean_over_target_tokens():
    from accelerate import Accelerator

    g = torch.Generator().manual_seed(0)
    docs = []
    for n, cut in ((7, 2), (12, 5), (9, 0)):
        ids = torch.randint(0, 128, (n,), generator=g).tolist()
        docs.append(Example(ids, [-100] * cut + ids[cut:]))
    model = tiny_llama(0)
    make_batch = lambda records, idx, cache=False: pack([records[i] for i in idx], pad_token_id=0,  # noqa: E731
                                                         flash_kwargs=False)
    result = evaluate(ObjectiveModel(model, "sft"), docs, make_batch, 2, Accelerator(cpu=True))
    total, count = 0.0, 0
    with torch.no_grad():
        for d in docs:
            logits = model(input_ids=torch.tensor([d.input_ids])).logits[0, :-1].float()
            labels = torch.tensor(d.labels[1:])
            total += float(F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum"))
            count += int((labels != -100).sum())
    assert result["examples"] == 3
    assert abs(result["loss"] - total / count) < 1e-4 * (total / count)
