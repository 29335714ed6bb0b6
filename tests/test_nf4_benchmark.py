"""benchmarks/gpu_nf4.py runs end to end in smoke mode (tests/benchmark_smoke.py): every section but the CUDA GEMV,
bitsandbytes as the peer on the CPU."""
from tests.benchmark_smoke import run_benchmark_smoke
from tests.utils import interpreter_only


@interpreter_only
def test_gpu_nf4_benchmark_smoke(tmp_path):
    result, stdout = run_benchmark_smoke("gpu_nf4.py", "nf4.json", tmp_path)
    assert result["errors"] == []
    checks = result["correctness"]
    assert [k for k, v in checks.items() if v is not True and not isinstance(v, list)] == []
    assert {"qlora fused within 1e-2 of fp32", "qlora dequant within 1e-2 of fp32"} <= checks.keys()
    assert [r["shape"] for r in result["dequant"]] == ["64x128", "96x64"]
    for row in result["qlora"]:
        assert all(row[f"{k}_ms"] > 0 for k in ("bf16_base", "fused", "dequant", "auto", "dequant_base", "peft_bnb"))
    assert len(result["gemv"]) == 4 and all(r["bf16_us"] > 0 for r in result["gemv"])
    assert "correctness: all exact checks passed" in stdout
