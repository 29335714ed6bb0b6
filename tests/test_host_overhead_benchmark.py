"""benchmarks/host_overhead.py on a GPU: the order of its passes (stubbed CUDA, so it runs on the CPU)."""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def test_real_launches_run_before_the_stubbed_ones(monkeypatch, tmp_path):
    """On a GPU the real-launch pass of an op comes first: the first QLoRA call runs the NF4 byte-permute decode's
    once-per-device check, which under the stub compared two unwritten buffers, warned falsely and cached False."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    monkeypatch.setenv("OUT", str(tmp_path))
    import host_overhead

    stubbed, seen = [False], []
    real_stub = host_overhead.launches_stubbed

    @contextlib.contextmanager
    def flagged():
        with real_stub():
            stubbed[0] = True
            try:
                yield
            finally:
                stubbed[0] = False

    monkeypatch.setattr(host_overhead, "launches_stubbed", flagged)
    monkeypatch.setattr(host_overhead, "CASES", {"probe": lambda: {"fastft": lambda: seen.append(stubbed[0]),
                                                                   "floor": lambda: None}})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the GPU branch; the probe makes no tensors
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    assert host_overhead.main(["--calls", "2", "--rounds", "1"]) == 0
    assert seen[0] is False and True in seen  # real first, then stubbed
    row, = json.loads((tmp_path / "host_overhead.json").read_text())
    assert {"fastft_us", "floor_us", "fastft_real_launches_us"} <= row.keys()
