"""fastft.kernels.autotune.Tuner with a stubbed timer: the fastest config per key, cached, failures skipped, and
an untimed pick launched once (its outputs stand)."""
import pytest

from fastft.kernels import autotune


def _tuner(monkeypatch, ms, timed):
    launched = []
    monkeypatch.setattr(autotune, "bench", lambda fn: (fn(), ms[launched[-1]])[1])
    tuner = autotune.Tuner("test", [{"c": name} for name in ms], timed=timed)

    def launch(config):
        if ms[config["c"]] is None:
            raise RuntimeError("does not compile here")
        launched.append(config["c"])
    return tuner, launched, launch


def test_timed_picks_the_fastest_per_key_and_caches_it(monkeypatch):
    tuner, launched, launch = _tuner(monkeypatch, {"a": 3.0, "b": 1.0, "broken": None, "c": 2.0}, timed=True)
    tuner.run("k", launch)
    # each runnable config compiled once and timed once, then the winner launched for real
    assert launched == ["a", "a", "b", "b", "c", "c", "b"] and tuner.best["k"] == {"c": "b"}
    launched.clear()
    tuner.run("k", launch)
    assert launched == ["b"]


def test_untimed_takes_the_first_that_runs_and_launches_it_once(monkeypatch):
    tuner, launched, launch = _tuner(monkeypatch, {"broken": None, "a": 3.0, "b": 1.0}, timed=False)
    monkeypatch.setattr(autotune, "bench", lambda fn: pytest.fail("untimed must not time"))
    tuner.run("k", launch)
    assert launched == ["a"] and tuner.best["k"] == {"c": "a"}
    tuner.run("k", launch)
    assert launched == ["a", "a"]


def test_no_config_runs(monkeypatch):
    tuner, _, launch = _tuner(monkeypatch, {"x": None}, timed=True)
    # the cause named in the message itself (it is the same for every config when the input is the problem)
    with pytest.raises(RuntimeError, match="no launch config compiled .* RuntimeError: does not compile here"):
        tuner.run("k", launch)


def test_a_key_first_seen_during_graph_capture_is_not_timed_nor_cached(monkeypatch):
    tuner, launched, launch = _tuner(monkeypatch, {"broken": None, "a": 3.0, "b": 1.0}, timed=True)
    monkeypatch.setattr(autotune, "capturing", lambda: True)
    monkeypatch.setattr(autotune, "bench", lambda fn: pytest.fail("timing syncs the device: not while capturing"))
    tuner.run("k", launch)
    assert launched == ["a"] and "k" not in tuner.best
    monkeypatch.setattr(autotune, "capturing", lambda: False)
    monkeypatch.setattr(autotune, "bench", lambda fn: (fn(), {"a": 3.0, "b": 1.0}[launched[-1]])[1])
    launched.clear()
    tuner.run("k", launch)  # outside the capture it is tuned as usual
    assert launched == ["a", "a", "b", "b", "b"] and tuner.best["k"] == {"c": "b"}


def test_deterministic_mode_takes_the_first_config_untimed(monkeypatch):
    """Configs of one kernel may sum in different orders (split-K 1, 2, 4): timing could pick another one in the
    next run or after --resume, and the bits would differ, which deterministic mode promises they do not. Under it
    the first config that runs is launched, untimed and not remembered (the mode is read on every call)."""
    tuner, launched, launch = _tuner(monkeypatch, {"broken": None, "a": 3.0, "b": 1.0}, timed=True)
    monkeypatch.setenv("FASTFT_DETERMINISTIC", "1")
    monkeypatch.setattr(autotune, "bench", lambda fn: pytest.fail("deterministic mode must not time"))
    tuner.run("k", launch)
    assert launched == ["a"] and "k" not in tuner.best
    monkeypatch.delenv("FASTFT_DETERMINISTIC")
    monkeypatch.setattr(autotune, "bench", lambda fn: (fn(), {"a": 3.0, "b": 1.0}[launched[-1]])[1])
    tuner.run("k", launch)
    assert tuner.best["k"] == {"c": "b"}


def test_bench_times_each_call_after_an_l2_flush_and_takes_the_median(monkeypatch):
    """The timer (CUDA events, faked here on a virtual clock): ~5 ms of warm-up, ~20 ms of timed calls (3 to 1000),
    each after zeroing an L2-sized buffer (not do_bench's 256 MB a call), the median of their times."""
    import torch

    clock, order = [0.0], []

    class Event:
        def __init__(self, enable_timing=False):
            assert enable_timing
            self.at = None

        def record(self):
            self.at = clock[0]

        def synchronize(self):
            pass

        def elapsed_time(self, end):
            return end.at - self.at

    class Flush:
        def zero_(self):
            order.append("flush")

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(autotune, "_l2_flush_buffer", Flush)
    for ms, timed in ((0.5, 40), (30.0, 3), (1e-4, 1000)):
        order.clear()
        durations = iter([ms] * 10**4)

        def fn():
            clock[0] += next(durations)
            order.append("fn")

        assert autotune.bench(fn) == pytest.approx(ms)
        assert order.count("flush") == timed
        first_flush = order.index("flush")
        assert order[first_flush:] == ["flush", "fn"] * timed  # every timed call right after its flush
        warmup = first_flush - 4  # (the launch before the estimate, and the estimate's 3)
        assert warmup == min(100, max(1, int(5 / ms)))
    # an odd call in between does not move the median
    durations = iter([1.0] * 12 + [50.0] + [1.0] * 100)
    assert autotune.bench(lambda: clock.__setitem__(0, clock[0] + next(durations))) == pytest.approx(1.0)
