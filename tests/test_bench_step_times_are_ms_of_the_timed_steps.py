"""A bench row's timings: step_ms_all holds the timed steps only (in milliseconds, the warm-up left out), step_ms is
their mean, step_ms_median their median, and tokens/s is the batch's tokens over the mean step time. The steps are
made to take known, unequal times (the optimizer step advances the clock run.py reads, which nothing else moves), so
a mean/median mix-up, a wrong unit or a timed warm-up step shows."""
import statistics
import types

import pytest
import torch

from fastft.apps.bench import run
from fastft.apps.bench.config import BenchConfig

WARMUP_S, STEP_S = 1.0, [0.05, 0.05, 0.3]   # one slow warm-up step; timed steps with mean != median


def test_step_times_are_the_timed_steps_mean_median_and_tokens_per_s(monkeypatch):
    delays = [WARMUP_S, *STEP_S]
    clock = [0.0]
    monkeypatch.setattr(run, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    real = run.make_optimizer

    def slow_optimizer(*args, **kwargs):
        optimizer = real(*args, **kwargs)
        inner = optimizer.step

        def step(*a, **k):
            clock[0] += delays.pop(0)
            return inner(*a, **k)
        optimizer.step = step
        return optimizer

    monkeypatch.setattr(run, "make_optimizer", slow_optimizer)
    marks = []  # the clock window spans the timed steps: marked after the warm-up, read after the last step
    monkeypatch.setattr(run, "clock_log", lambda: types.SimpleNamespace(
        mark=lambda: marks.append(("mark", len(delays))) or 7.0,
        since=lambda mark: marks.append(("since", mark, len(delays))) or dict(sm_mhz=1754.6, power_w=611.2)))
    cfg = BenchConfig(shape="tiny", steps=len(STEP_S), warmup=1, seq_len=8, batch_size=2, methods=("lora",), peers=())
    row = run.run_one(cfg, "lora", "fastft", torch.device("cpu"))
    assert row["status"] == "ok", row
    assert not delays
    timed = row["step_ms_all"]
    assert len(timed) == len(STEP_S)
    assert timed == pytest.approx([s * 1e3 for s in STEP_S])   # milliseconds, none holding the warm-up's
    assert row["step_ms"] == pytest.approx(statistics.fmean(timed))
    assert row["step_ms_median"] == pytest.approx(statistics.median(timed))
    assert row["tokens_per_s"] == pytest.approx(2 * 8 / (statistics.fmean(timed) / 1e3))
    assert row["warmup_steps"] == 1 and row["warmup_s"] == pytest.approx(WARMUP_S)
    assert marks == [("mark", len(STEP_S)), ("since", 7.0, 0)]
    assert row["sm_mhz"] == 1755 and row["power_w"] == 611
