"""The CPU peak memory the apps report (fastft train's metrics.json, `fastft study`'s cells, `fastft bench`'s rows)
comes from one place: getrusage's ru_maxrss is KiB on Linux and bytes on macOS, where the training loop and the
study read it as KiB (1024× too high there)."""
import resource
import sys
from types import SimpleNamespace

import pytest
import torch

from fastft.apps import host_memory
from fastft.apps.training.logs import peak_memory_gib


@pytest.mark.parametrize("platform, maxrss", [("linux", 3 * 2**20), ("darwin", 3 * 2**30)])
def test_the_peak_reads_ru_maxrss_in_the_platforms_unit(monkeypatch, platform, maxrss):
    monkeypatch.setattr(sys, "platform", platform)
    monkeypatch.setattr(resource, "getrusage", lambda who: SimpleNamespace(ru_maxrss=maxrss))
    assert host_memory.peak_rss_bytes() == 3 * 2**30
    assert peak_memory_gib(torch.device("cpu")) == 3.0


def test_rss_now_is_below_the_peak_and_falls_back_to_it(monkeypatch):
    now = host_memory.rss_bytes()
    assert 0 < now <= host_memory.peak_rss_bytes() * 1.01
    monkeypatch.setattr(host_memory, "open", lambda *a: (_ for _ in ()).throw(OSError("no /proc")), raising=False)
    assert host_memory.rss_bytes() == host_memory.peak_rss_bytes()
