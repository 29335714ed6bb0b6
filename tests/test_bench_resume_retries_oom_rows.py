"""A resumed `fastft bench` table measures its out-of-memory rows again (an OOM can be transient, or memory another
row left fragmented), as it does crashed rows; measured and unavailable rows are kept."""
import torch

from fastft.apps.bench import methods as methods_module
from fastft.apps.bench.config import BenchConfig
from fastft.apps.bench.methods import bench_methods, planned_row


def test_oom_and_error_rows_are_measured_again_on_resume(monkeypatch):
    calls = []

    def run_one(cfg, method, implementation, device, compile="off"):
        calls.append((method, implementation))
        return {"method": method, "implementation": implementation, "peer": implementation, "compile": compile,
                "status": "ok", "tokens_per_s": 1000.0, "step_ms": 8.0, "peak_gib": 0.1, "trainable_params": 10,
                "memory_kind": "cpu peak RSS"}

    monkeypatch.setattr(methods_module, "run_one", run_one)
    monkeypatch.setattr(methods_module.peers, "preload", lambda: None)
    cfg = BenchConfig(shape="tiny", methods=("lora", "dora"), peers=("peft",), warmup=1)
    previous = {"wall_s": 5.0, "rows": [
        planned_row("lora", "fastft", "off") | {"status": "ok", "tokens_per_s": 1.0},
        planned_row("lora", "peft", "off") | {"status": "oom", "reason": "CUDA out of memory"},
        planned_row("dora", "fastft", "off") | {"status": "error", "error": "RuntimeError"},
        planned_row("dora", "peft", "off") | {"status": "unavailable", "reason": "no path"}]}
    result = bench_methods(cfg, torch.device("cpu"), progress=False, previous=previous)
    assert calls == [("lora", "peft"), ("dora", "fastft")]
    assert [r["status"] for r in result["rows"]] == ["ok", "ok", "ok", "unavailable"]
    assert result["complete"] is True and result["wall_s"] >= 5.0
