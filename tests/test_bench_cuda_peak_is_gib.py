"""PeakMemory on CUDA reports GiB (bytes / 2**30); checked on the CPU with torch.cuda's calls stubbed."""
import torch

from fastft.apps.bench import harness


def test_cuda_meter_reports_gib(monkeypatch):
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda *a, **k: None)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a, **k: 3 * 2**30)
    meter = harness.PeakMemory(torch.device("cuda", 0))
    with meter:
        pass
    assert meter.peak_gib == 3.0
    assert meter.kind.startswith("cuda")
