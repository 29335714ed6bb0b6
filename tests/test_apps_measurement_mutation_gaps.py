"""Small measurement and data rules a mutation run found no test pinning: a kernel benchmark's peak memory is the
call's own (above what was allocated before it), a clock window's mean power averages the samples that have one,
the CPU's device name carries its model (tables of two CPUs are not mixed), MR's positive half ends at id 5152, and
the study's splits interleave their classes (the few-shot sample is drawn from that order)."""
import builtins
import io

import pytest
import torch

from fastft.apps import datasets
from fastft.apps.bench import harness
from fastft.apps.bench.clocks import ClockLog
from fastft.apps.provenance import device_name
from fastft.apps.study.tasks import STUDY_TASKS, load_study_task


def test_peak_memory_is_the_calls_own(monkeypatch):
    cuda = torch.cuda
    monkeypatch.setattr(cuda, "is_available", lambda: True)
    monkeypatch.setattr(cuda, "synchronize", lambda *a, **k: None)
    monkeypatch.setattr(cuda, "reset_peak_memory_stats", lambda *a, **k: None)
    monkeypatch.setattr(cuda, "memory_allocated", lambda *a, **k: 1024 * 2**20)      # weights live before the call
    monkeypatch.setattr(cuda, "max_memory_allocated", lambda *a, **k: 1536 * 2**20)  # the call's peak
    assert harness.peak_memory_mib(lambda: None) == 512.0


def test_a_clock_windows_power_averages_the_samples_that_have_one():
    log = ClockLog(source=None)  # no sampling thread: samples given by hand
    log.samples = [(0.0, 1500.0, 300.0), (0.01, 1500.0, None), (0.02, 1400.0, 310.0), (0.03, 1400.0, None)]
    assert log.window(0.0, 1.0) == dict(sm_mhz=1450.0, sm_mhz_min=1400.0, power_w=305.0, samples=4)


def test_the_cpus_device_name_carries_its_model(monkeypatch):
    real_open = builtins.open

    def fake_open(path, *args, **kwargs):
        if path == "/proc/cpuinfo":
            return io.StringIO("processor\t: 0\nmodel name\t: Test CPU 9000\n")
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", fake_open)
    assert device_name(torch.device("cpu")) == "cpu (Test CPU 9000)"


def test_mr_positive_half_ends_at_id_5152():
    rows = datasets._movie_reviews()
    assert len(rows) == 10605 and sum(y for _, y in rows) == 5152
    labels = dict(rows)
    assert labels["Simplistic, silly and tedious."] == 0  # id 5153: the negative half's first line


@pytest.mark.parametrize("name", STUDY_TASKS)
def test_the_splits_interleave_their_classes(name):
    task = load_study_task(name)
    for split in (task.train, task.dev, task.test):
        labels = [y for _, y in split]
        runs = 1 + sum(a != b for a, b in zip(labels, labels[1:]))
        assert runs > 2 * len(set(labels)), (name, runs)  # class-sorted: one run per class
