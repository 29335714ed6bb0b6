"""benchmarks/gpu_patch_step.py runs end to end in smoke mode (tests/benchmark_smoke.py): every variant but
peft+Liger (Liger is a GPU-machine peer, not installed here) trains its steps."""
import pytest

from tests.benchmark_smoke import run_benchmark_smoke
from tests.utils import interpreter_only


@pytest.mark.slow
@interpreter_only
def test_gpu_patch_step_benchmark_smoke(tmp_path):
    result, stdout = run_benchmark_smoke("gpu_patch_step.py", "patch_step.json", tmp_path)
    rows = {r["variant"]: r for r in result["rows"]}
    for variant in ("peft", "fastft", "fastft+patch", "fastft+patch+lm_head"):
        assert rows[variant]["tokens_per_s"] > 0 and "error" not in rows[variant], rows[variant]
    assert rows["fastft"]["last_loss"] == pytest.approx(rows["peft"]["last_loss"], rel=1e-4)
    assert "## LoRA r16 training step" in stdout
