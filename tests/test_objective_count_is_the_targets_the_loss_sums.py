"""ObjectiveModel.count (what a step's loss is divided by) without pack's host-side num_targets: the labels that
follow a position, labels[:, 1:], the same targets the loss sums (hidden_at_targets). Mutation run 18: counting
labels[:, :-1] (off by one position) passed every test; it differs when the first label is masked (a prompt) and the
last is not."""
import torch

from fastft.apps.training.data import Example, pack
from fastft.apps.training.objectives import ObjectiveModel, hidden_at_targets
from tests.utils import tiny_llama


def test_count_without_num_targets_is_the_number_of_targets():
    ids = torch.randint(0, 128, (9,), generator=torch.Generator().manual_seed(0)).tolist()
    batch = pack([Example(ids, [-100] * 3 + ids[3:])], pad_token_id=0, flash_kwargs=False)
    batch.pop("num_targets", None)
    model = tiny_llama(0)
    with torch.no_grad():
        targets = hidden_at_targets(model, batch)[1]
    assert ObjectiveModel(model, "sft").count(batch) == targets.numel()
