"""benchmarks/gpu_train.py runs end to end with --cpu-smoke (a tiny model, 2 steps, LoRA; tests/benchmark_smoke.py):
both sides train with the same optimizer, weight decay, clipping and precision, and the results are strict JSON
(memory not measured on the CPU is null, not NaN)."""
import json

import pytest

from tests.benchmark_smoke import run_benchmark_smoke


def test_gpu_train_benchmark_smoke(tmp_path):
    result, stdout = run_benchmark_smoke("gpu_train.py", "train.json", tmp_path, "--cpu-smoke")
    assert result["failures"] == []
    assert [(r["model"], r["method"], r["run"]) for r in result["rows"]] == [
        ("tiny", "lora", "fastft"), ("tiny", "lora", "fastft, compile smoke + buckets"),
        ("tiny", "lora", "transformers Trainer + peft")]
    assert all(r["tokens_per_s"] > 0 for r in result["rows"])
    assert "## fastft train step vs Trainer + peft" in stdout
    fastft, compiled, trainer = result["rows"]
    # the same documents: the same real tokens, whatever the padding (tokens/s counts the real ones)
    assert compiled["tokens_per_s"] * compiled["step_ms"] == pytest.approx(fastft["tokens_per_s"] * fastft["step_ms"])
    assert fastft["setup"] == trainer["setup"], (fastft["setup"], trainer["setup"])
    assert fastft["setup"]["weight_decay"] == [0.0] and fastft["setup"]["autocast"] is False
    assert fastft["peak_gib"] is None and trainer["peak_gib"] is None
    json.loads((tmp_path / "train.json").read_text(), parse_constant=lambda token: 1 / 0)  # no NaN / Infinity
