"""Two Tuner rules the other autotune tests leave open: with timed=None (the default), a kernel with one config is
never timed even where timing is on (there is nothing to choose; timing would cost a first step's sync for nothing),
and the registry keeps one Tuner per kernel *name* as well as per config content: two kernels that happen to share a
config list must not share tuning results (one kernel's `best` for a key would be launched for the other)."""
import pytest

from fastft.kernels import autotune
from fastft.kernels.autotune import tuner


def _timing_on(monkeypatch):
    """The conditions under which timed=None does time: no interpreter, FASTFT_AUTOTUNE unset, not deterministic."""
    monkeypatch.setattr(autotune, "INTERPRET", False)
    monkeypatch.delenv("FASTFT_AUTOTUNE", raising=False)
    monkeypatch.delenv("FASTFT_DETERMINISTIC", raising=False)
    monkeypatch.setattr(autotune, "capturing", lambda: False)


def test_a_single_config_is_launched_untimed(monkeypatch):
    _timing_on(monkeypatch)
    monkeypatch.setattr(autotune, "bench", lambda fn: pytest.fail("one config: nothing to time"))
    launched = []
    single = autotune.Tuner("test_single", [{"BLOCK": 32}])
    single.run("k", launched.append)
    assert launched == [{"BLOCK": 32}] and single.best["k"] == {"BLOCK": 32}


def test_several_configs_are_timed_under_the_same_conditions(monkeypatch):
    """The control: the same conditions do time a kernel with a choice."""
    _timing_on(monkeypatch)
    timed = []
    monkeypatch.setattr(autotune, "bench", lambda fn: (fn(), timed.append(1), 1.0)[2])
    autotune.Tuner("test_pair", [{"BLOCK": 32}, {"BLOCK": 64}]).run("k", lambda config: None)
    assert len(timed) == 2


def test_kernels_with_equal_configs_get_their_own_tuners():
    configs = [{"BLOCK": 32, "num_warps": 4}, {"BLOCK": 64, "num_warps": 4}]
    a = tuner("test_registry_kernel_a", configs)
    b = tuner("test_registry_kernel_b", [dict(c) for c in configs])
    assert a is not b and a.name == "test_registry_kernel_a" and b.name == "test_registry_kernel_b"
    a.best["k"] = configs[1]
    assert "k" not in b.best
