"""The next step's micro-batches are built while the device runs the current step: the plan's cursor does not
move for it (a checkpoint stores the right one), the batches are exactly the plan's, and an error building them
is raised at the step that takes them."""
import types

import pytest
import torch

from fastft.apps.cli import main
from fastft.apps.training import loop
from fastft.apps.training.batches import Batches
from fastft.apps.training.data import BatchPlan, Example
from tests import train_utils

tiny = train_utils.tiny  # the shared fixture


@pytest.mark.parametrize("processes, rank", [(1, 0), (2, 1)])
def test_peek_step_returns_the_next_step_and_keeps_the_cursor(processes, rank):
    plan = BatchPlan(11, 2, 2, processes, seed=3)
    for _ in range(9):  # across several epoch boundaries (a step of 4 or 8 records of 11)
        before = plan.state_dict()
        peeked = plan.peek_step(rank)
        assert plan.state_dict() == before
        assert plan.next_step(rank) == peeked


class _Encoder:
    tokenizer = types.SimpleNamespace(pad_token_id=0)
    last_cut = False

    def __init__(self):
        self.encoded = []

    def encode(self, record):
        self.encoded.append(record)
        if record == "bad":
            raise ValueError("record 'bad' cannot be tokenized")
        return Example([1, 2, record], [-100, 2, record], None)


def test_step_takes_the_prefetched_batches_only_for_the_same_records():
    batches = Batches(_Encoder(), torch.device("cpu"), flash_kwargs=False)
    records = [5, 6, 7, 8]
    batches.prefetch(records, [[0], [1]])
    built = batches.ready[1]
    assert batches.step(records, [[0], [1]]) is built and batches.ready is None
    batches.prefetch(records, [[2], [3]])
    other = batches.step(records, [[3], [2]])  # another step than prefetched (not what the loop does): built now
    assert [int(b["input_ids"][0, -1]) for b in other] == [8, 7] and batches.ready is None


def test_a_prefetch_error_is_raised_by_the_step_that_takes_it():
    encoder = _Encoder()
    batches = Batches(encoder, torch.device("cpu"), flash_kwargs=False)
    batches.prefetch([5, "bad"], [[0, 1]])  # no raise here: the step running now is not the one at fault
    with pytest.raises(ValueError, match="record 'bad'"):
        batches.step([5, "bad"], [[0, 1]])


@pytest.mark.slow
def test_training_builds_each_steps_batches_once_ahead(tiny, tmp_path, monkeypatch):
    plan_steps, built = [], []
    next_step, call = BatchPlan.next_step, Batches.__call__

    def planned(self, rank):
        plan_steps.append(next_step(self, rank))
        return plan_steps[-1]

    def building(self, records, indices, cache=True):
        if cache:  # training batches (evaluation builds uncached ones)
            built.append(list(indices))
        return call(self, records, indices, cache)

    monkeypatch.setattr(BatchPlan, "next_step", planned)
    monkeypatch.setattr(Batches, "__call__", building)
    prefetched = []
    prefetch = Batches.prefetch
    monkeypatch.setattr(Batches, "prefetch",
                        lambda self, records, micro: (prefetched.append(micro), prefetch(self, records, micro)))
    assert main(["train", "--model", str(tiny), "--steps", "4", "--batch-size", "2", "--grad-accum", "2",
                 "--eval-examples", "2", "--max-length", "24", "--output-dir", str(tmp_path / "run")]) == 0
    # peek_step calls next_step too: the real steps are the plan's calls that were not peeks
    steps = [s for i, s in enumerate(plan_steps) if i % 2 == 0]
    assert len(steps) == 4 and prefetched == steps[1:]
    assert built == [indices for step in steps for indices in step]  # each micro-batch built once, in order



def test_records_of_a_prefetched_step_count_once_it_is_taken():
    # a checkpoint written between the steps keeps the record flags of the steps trained, not the prefetched one's
    batches = Batches(_Encoder(), torch.device("cpu"), flash_kwargs=False)
    records = [5, 6, 7, 8]
    batches.step(records, [[0], [1]])
    batches.prefetch(records, [[2], [3]])
    assert batches.tokenized() == (set(), {0, 1})
    batches.step(records, [[2], [3]])
    assert batches.tokenized() == (set(), {0, 1, 2, 3})


@pytest.mark.slow
def test_tokens_per_second_leaves_out_each_runs_first_step(tiny, tmp_path, monkeypatch):
    """The first step of a process compiles and autotunes kernels (tens of seconds on a GPU): the progress bar's and
    metrics.json's tokens/s count the steps after it, as the study and the bench leave out their warm-up steps."""
    import json
    import time

    calls, accumulate = [], loop.accumulate

    def slow_first(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            time.sleep(1.0)  # a first step's compiling
        return accumulate(*args, **kwargs)

    monkeypatch.setattr(loop, "accumulate", slow_first)
    out = tmp_path / "run"
    assert main(["train", "--model", str(tiny), "--steps", "3", "--batch-size", "2", "--eval-examples", "2",
                 "--max-length", "24", "--output-dir", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    steps = [json.loads(line) for line in (out / "logs.jsonl").read_text().splitlines()]
    tokens = [s["tokens"] for s in steps if "tokens" in s]
    assert len(tokens) == 3 and metrics["train_seconds"] > 1.0
    seconds = [s["step_seconds"] for s in steps if "tokens" in s]
    assert seconds[0] > 1.0  # the slow first step is timed in the run's seconds, but not in its speed:
    assert metrics["tokens_per_second"] == pytest.approx(sum(tokens[1:]) / sum(seconds[1:]), rel=0.02)
    assert metrics["tokens_per_second"] > sum(tokens) / metrics["train_seconds"]
    # while only the first step has run, it is the speed shown
    assert steps[0]["tokens_per_second"] == pytest.approx(tokens[0] / steps[0]["step_seconds"], rel=0.05)
