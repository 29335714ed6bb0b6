"""benchmarks/gpu_layers.py runs end to end in smoke mode (tests/benchmark_smoke.py)."""
from tests.benchmark_smoke import run_benchmark_smoke
from tests.utils import interpreter_only


@interpreter_only
def test_gpu_layers_benchmark_smoke(tmp_path):
    result, stdout = run_benchmark_smoke("gpu_layers.py", "layers.json", tmp_path)
    assert result["correctness_failures"] == [] and result["complete"] is True
    rows = result["rows"]
    assert not [r["method"] for r in rows if "FAILED" in r["method"]]
    timed = {(r["op"], r["pass_"], r["method"]) for r in rows if r["ms"] > 0}
    for op in ("rms_norm", "rms_norm+residual", "rope q,k", "swiglu", "geglu"):
        for pass_ in ("fwd", "fwd+bwd"):
            assert {(op, pass_, "fastft"), (op, pass_, "torch")} <= timed, (op, pass_)
    assert "## layer ops" in stdout
