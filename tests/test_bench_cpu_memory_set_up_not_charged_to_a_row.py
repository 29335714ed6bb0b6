"""CPU peak memory of `fastft bench` rows (an RSS delta): the fastft-patched code path's first-use state was charged
to the first fastft row (7.8 MiB where the same row later read 2.7): preload() now runs one patched LoRA step too.
And memory a row's build freed (a QLoRA row's dense weights, once quantized) stayed in the RSS its peak is read
from: it is handed back right after the build. (RSS figures themselves are too noisy to assert here.)"""
import torch

from fastft.apps.bench import peers, run
from fastft.apps.bench.config import BenchConfig


def test_preload_runs_a_patched_fastft_step(monkeypatch):
    calls = []
    real = peers._fastft

    def recording(method, options, build, patch_model):
        calls.append((method, patch_model))
        return real(method, options, build, patch_model)

    monkeypatch.setattr(peers, "_fastft", recording)
    peers.preload()
    assert calls == [("lora", True)]


def test_memory_freed_by_the_build_is_released_before_the_timed_steps(monkeypatch):
    events = []
    real_prepare, real_release = peers.prepare, run.release_freed_memory
    monkeypatch.setattr(peers, "prepare", lambda *a, **k: (events.append("build"), real_prepare(*a, **k))[1])
    monkeypatch.setattr(run, "release_freed_memory", lambda: (events.append("release"), real_release())[1])
    real_enter = run.PeakMemory.__enter__
    monkeypatch.setattr(run.PeakMemory, "__enter__", lambda self: (events.append("timed"), real_enter(self))[1])
    cfg = BenchConfig(shape="tiny", steps=1, warmup=1, seq_len=8, batch_size=1, methods=("lora",), peers=())
    assert run.run_one(cfg, "lora", "fastft", torch.device("cpu"))["status"] == "ok"
    assert "release" in events[events.index("build"):events.index("timed")], events
