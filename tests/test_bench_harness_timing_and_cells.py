"""The kernel benchmarks' shared harness: time_cases calls each case once untimed (compiling and autotuning stay
out of the timing) and keeps each case's best round; host_ms is milliseconds per call; table cells show a bool as
a word and None as a dash; rows_per_shape hands the rows so far to on_shape after every shape (a run cut short
keeps the shapes it finished)."""
import types

import pytest

from fastft.apps.bench import harness


def test_time_cases_warms_each_case_once_then_keeps_its_best_round():
    events = []
    cases = [{"name": "a", "fn": lambda: events.append("call a")}, {"name": "b", "fn": lambda: events.append("call b")}]
    rounds = {"a": iter([5.0, 2.0, 3.0]), "b": iter([1.0, 4.0, 9.0])}

    def timer(fn):
        case = next(c for c in cases if c["fn"] is fn)
        events.append("time " + case["name"])
        return next(rounds[case["name"]])

    harness.time_cases(cases, rounds=3, timer=timer)
    assert events[:2] == ["call a", "call b"] and events.count("call a") == events.count("call b") == 1
    assert events[2:] == ["time a", "time b"] * 3   # interleaved rounds
    assert [c["ms"] for c in cases] == [2.0, 1.0]
    assert [c["ms_rounds"] for c in cases] == [[5.0, 2.0, 3.0], [1.0, 4.0, 9.0]]


def test_paired_ratio_is_the_median_of_same_round_ratios_not_best_over_best():
    """Round 1 ran on a faster clock for both (1.0 and 1.35 ms), rounds 2-3 slower (1.5 and 1.8): the case took 1.2x
    the base in two rounds of three, while best ÷ best (1.35 / 1.0) pairs two timings of different rounds."""
    base, case = {"ms_rounds": [1.0, 1.5, 1.5]}, {"ms_rounds": [1.35, 1.8, 1.8]}
    assert harness.paired_ratio(case, base) == pytest.approx(1.2)
    assert min(case["ms_rounds"]) / min(base["ms_rounds"]) == pytest.approx(1.35)
    nan = harness.paired_ratio({"ms_rounds": [2.0]}, {"ms_rounds": [0.0]})  # no round to pair
    assert nan != nan


def test_host_ms_is_per_call(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(harness, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))

    def call():  # 10 ms a call, on the clock host_ms reads
        clock[0] += 0.01

    assert harness.host_ms(call, calls=5) == pytest.approx(10.0)


@pytest.mark.parametrize("value, spec, cell", [(True, ".3f", "True"), (False, ".2f", "False"), (None, ".3f", "—"),
                                               (1.23456, ".3f", "1.235"), (1234567, ",d", "1,234,567"),
                                               ("n/a", ".3f", "n/a")])
def test_cells(value, spec, cell):
    assert harness.fmt(value, spec) == cell


def test_markdown_table_cells_and_rule():
    text = harness.markdown_table([{"a": 1.0, "b": True, "c": None}], ["a", "b", "c"], formats={"b": ".2f"})
    assert text.splitlines() == ["| a | b | c |", "|---|---|---|", "| 1.000 | True |  |"]


def test_rows_per_shape_hands_the_rows_so_far_after_each_shape(capsys):
    seen = []
    harness.rows_per_shape([(1, 2), (3, 4)], lambda k, n: [{"shape": f"{k}->{n}", "method": "m"}], ["shape", "method"],
                           on_shape=lambda rows: seen.append([r["shape"] for r in rows]))
    assert seen == [["1->2"], ["1->2", "3->4"]]
