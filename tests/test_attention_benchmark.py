"""benchmarks/gpu_attention.py runs end to end in smoke mode (tests/benchmark_smoke.py)."""
from tests.benchmark_smoke import run_benchmark_smoke
from tests.utils import interpreter_only


@interpreter_only
def test_gpu_attention_benchmark_smoke(tmp_path):
    result, stdout = run_benchmark_smoke("gpu_attention.py", "attention.json", tmp_path)
    checks = [r for r in result["rows"] if r["section"] == "correctness"]
    assert checks and all(r["ok"] for r in checks), checks
    timed = {(r["section"], r.get("method"), r.get("layout")) for r in result["rows"] if "fwdbwd_ms" in r}
    assert ("dense", "fastft", None) in timed and ("packing", "fastft", "packed") in timed
    assert "### Packed vs padded" in stdout
