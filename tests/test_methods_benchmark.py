"""benchmarks/gpu_methods.py runs end to end in smoke mode (tests/benchmark_smoke.py)."""
from tests.benchmark_smoke import run_benchmark_smoke
from tests.utils import interpreter_only


@interpreter_only
def test_gpu_methods_benchmark_smoke(tmp_path):
    result, stdout = run_benchmark_smoke("gpu_methods.py", "methods.json", tmp_path)
    assert result["correctness_failures"] == []
    timed = {r["method"] for r in result["rows"] if r.get("ms", 0) > 0}
    assert timed == {"frozen base", "fastft LoRA", "fastft DoRA", "peft DoRA", "fastft IA3 out", "peft IA3 out",
                     "fastft IA3 ff", "peft IA3 ff"}
    assert {r["method"] for r in result["adapter"] if r.get("ms", 0) > 0} == {"fastft adapter", "torch adapter"}
    assert "## bottleneck adapter fwd+bwd" in stdout
