"""PeakMemory on the CPU reports the resident set's peak above the baseline taken when the meter was made
(the model's own build is not the step's memory); checked with the RSS reading stubbed."""
import torch

from fastft.apps.bench import harness


def test_cpu_meter_subtracts_the_baseline(monkeypatch):
    rss = {"now": 10 * 2**30}
    monkeypatch.setattr(harness, "rss_bytes", lambda: rss["now"])
    meter = harness.PeakMemory(torch.device("cpu"))
    rss["now"] = 10 * 2**30 + 2**29  # half a GiB more during the stretch
    with meter:
        pass
    assert meter.peak_gib == 0.5
    assert meter.kind.startswith("cpu")
