"""`fastft bench --compile` with --warmup 1: fastft's patched model compiled again on its second call (a guard on
a note the first traced call writes), inside the first timed step: a row marked "ok" at ~1/100 of its tokens/s.
The patched Llama now compiles once; a model that still compiles again in a warm-up step after the first warms up
on until a step compiles nothing (at most EXTRA_WARMUP more), and a compilation left among the timed steps makes the
row "compiled while timed" (no numbers to compare)."""
import torch

from fastft.apps.bench import run
from fastft.apps.bench.config import BenchConfig

CPU = torch.device("cpu")
CFG = dict(shape="tiny", steps=1, seq_len=8, batch_size=1, methods=("lora",), peers=(), compile="default",
           compile_backend="eager")


def test_a_compiled_fastft_row_with_one_warm_up_step_times_no_compilation():
    row = run.run_one(BenchConfig(**CFG, warmup=1), "lora", "fastft", CPU, compile="default")
    assert row["status"] == "ok", row
    assert row["compiled_while_timed"] is False and row["warmup_steps"] == 1


def _graphs_by_call(monkeypatch, graphs):
    """run.dynamo_counts returning graphs[i] at its i-th call (the last value after that)."""
    calls = []

    def counts():
        calls.append(None)
        return {"graphs": graphs[min(len(calls), len(graphs)) - 1], "graph_breaks": 0, "recompile_limit_hits": 0}

    monkeypatch.setattr(run, "dynamo_counts", counts)


def test_a_warm_up_step_that_compiles_again_adds_warm_up(monkeypatch):
    # calls: start; step 1 before/after (its first compile); step 2 before/after (compiled again); step 3: nothing
    _graphs_by_call(monkeypatch, [0, 0, 1, 1, 2, 2, 2])
    row = run.run_one(BenchConfig(**CFG, warmup=2), "lora", "fastft", CPU, compile="default")
    assert row["status"] == "ok" and row["warmup_steps"] == 3 and row["compiled_while_timed"] is False, row


def test_a_compilation_among_the_timed_steps_is_flagged(monkeypatch):
    # calls: start; step 1 before/after; before the timed steps; after them (compiled again)
    _graphs_by_call(monkeypatch, [0, 0, 1, 1, 2])
    row = run.run_one(BenchConfig(**CFG, warmup=1), "lora", "fastft", CPU, compile="default")
    assert row["status"] == "compiled while timed" and "after 1 warm-up steps" in row["reason"], row
