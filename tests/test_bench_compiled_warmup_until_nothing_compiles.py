"""`fastft bench --compile` with --warmup 1: fastft's patched model compiled again on its second call (a guard on
a note the first traced call writes), inside the first timed step: a row marked "ok" at ~1/100 of its tokens/s.
A compiled run now warms up until a step compiles nothing (at most EXTRA_WARMUP more), and a compilation left
among the timed steps makes the row "compiled while timed"."""
import torch

from fastft.apps.bench import run
from fastft.apps.bench.config import BenchConfig

CPU = torch.device("cpu")


def test_a_recompiling_second_step_is_warm_up_not_timed():
    cfg = BenchConfig(shape="tiny", steps=2, warmup=1, seq_len=8, batch_size=1, methods=("lora",), peers=(),
                      compile="default", compile_backend="eager")
    row = run.run_one(cfg, "lora", "fastft", CPU, compile="default")
    assert row["status"] == "ok", row
    assert row["compiled_while_timed"] is False
    assert 1 <= row["warmup_steps"] <= 1 + run.EXTRA_WARMUP


def test_a_compilation_among_the_timed_steps_is_named():
    verdict = run._verdict({"loss_first": 1.0, "loss_last": 1.0, "warmup_steps": 4, "compiled_while_timed": True,
                            "compile_stats": {"graphs": 2, "graph_breaks": 0, "recompile_limit_hits": 0}})
    assert verdict["status"] == "compiled while timed" and "after 4 warm-up steps" in verdict["reason"]
