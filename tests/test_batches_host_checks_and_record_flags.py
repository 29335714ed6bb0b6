"""fastft.apps.training.batches.Batches without a model: every token id (inputs, labels, label words) at or past the
model's token rows is refused on the host (the boundary id included); evaluation batches are not padded to bucket
lengths; the records a step tokenized (and cut) count once the step is taken, whatever a prefetch built before it;
record_flags keeps the flags of the run before a --resume."""
import types

import pytest
import torch

from fastft.apps.training.batches import Batches, record_flags
from fastft.apps.training.config import ConfigError
from fastft.apps.training.data import Example


class _Tokenizer:
    pad_token_id = 0

    def __len__(self):
        return 12


class _Encoder:
    """Records are (input ids, label words); a record whose first id is 99 counts as cut by --max-length."""
    tokenizer = _Tokenizer()

    def __init__(self):
        self.last_cut = False

    def encode(self, record):
        ids, choices = record
        self.last_cut = ids[0] == 99
        return Example(list(ids), [-100] + list(ids[1:]), choices)


def _batches(**kwargs):
    return Batches(_Encoder(), torch.device("cpu"), flash_kwargs=True, **kwargs)


@pytest.mark.parametrize("record", [([1, 2, 10], None), ([1, 2, 3], (4, 10))], ids=["input_id", "label_word"])
def test_an_id_equal_to_the_token_rows_is_refused_on_the_host(record):
    batches = _batches(token_rows=10)
    records = [([1, 2, 9], (3, 9)), record]
    assert batches(records, [0])["checked_on_host"] is True  # the last row: fine
    with pytest.raises(ConfigError, match="training record 1 holds token id 10, but the model has 10 token rows"):
        batches(records, [1])


def test_evaluation_batches_are_not_padded_to_a_bucket_length():
    batches = _batches(bucket=True)
    records = [([1, 2, 3], None), ([4, 5, 6, 7, 8], None)]
    assert batches(records, [0, 1], cache=False)["input_ids"].shape == (1, 8)  # evaluation: the documents only
    assert batches(records, [0, 1])["input_ids"].shape[1] > 8  # training: padded to its bucket


def test_records_count_once_their_step_is_taken():
    batches = _batches()
    records = [([1, 2], None), ([99, 2], None), ([3, 4], None), ([99, 5], None)]
    batches.step(records, [[0], [1]])
    assert batches.tokenized() == ({1}, {0, 1})
    batches.prefetch(records, [[1], [2, 3]])  # record 1 again (a later epoch), 3 cut: not trained on yet
    assert batches.tokenized() == ({1}, {0, 1})
    batches.step(records, [[1], [2, 3]])
    assert batches.tokenized() == ({1, 3}, {0, 1, 2, 3})


def test_a_prefetch_another_step_replaced_leaves_no_record_pending():
    batches = _batches()
    records = [([1, 2], None), ([99, 2], None), ([3, 4], None)]
    batches.prefetch(records, [[1], [2]])
    batches.step(records, [[2], [1]])  # another order than prefetched: built now, and trained on
    assert batches.tokenized() == ({1}, {1, 2})
    batches.step(records, [[0]])
    assert batches.tokenized() == ({1}, {0, 1, 2})


def test_record_flags_keep_the_earlier_runs_flags():
    batches = _batches()
    records = [([1, 2], None), ([99, 2], None), ([3, 4], None), ([5, 6], None)]
    batches.step(records, [[0, 1]])
    accelerator = types.SimpleNamespace(device=torch.device("cpu"), reduce=lambda t, op: t)
    earlier = torch.tensor([[False, False, False, True], [False, False, True, True]])
    flags = record_flags(batches, 4, earlier, accelerator)
    assert flags.tolist() == [[False, True, False, True], [True, True, True, True]]
    assert record_flags(batches, 4, None, accelerator).tolist() == [[False, True, False, False],
                                                                   [True, True, False, False]]
