"""benchmarks/gpu_losses.py runs end to end in smoke mode (tests/benchmark_smoke.py)."""
from tests.benchmark_smoke import run_benchmark_smoke
from tests.utils import interpreter_only


@interpreter_only
def test_gpu_losses_benchmark_smoke(tmp_path):
    result, stdout = run_benchmark_smoke("gpu_losses.py", "losses.json", tmp_path)
    assert result["correctness_failures"] == []
    methods = [r["method"] for r in result["ce"]]
    assert methods[0].startswith("torch") and "fastft (default chunk)" in methods and all("ms" in r for r in result["ce"])
    assert [r["method"] for r in result["kl"]] == ["torch KL (logits materialised)", "fastft linear_kl_div"]
    assert "## linear + cross-entropy" in stdout
