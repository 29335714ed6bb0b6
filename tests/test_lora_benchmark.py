"""benchmarks/gpu_lora.py runs end to end in smoke mode (tests/benchmark_smoke.py)."""
from tests.benchmark_smoke import run_benchmark_smoke
from tests.utils import interpreter_only


@interpreter_only
def test_gpu_lora_benchmark_smoke(tmp_path):
    result, stdout = run_benchmark_smoke("gpu_lora.py", "lora.json", tmp_path)
    assert result["correctness_failures"] == [] and result["overlap_failures"] == []
    rows = result["rows"]
    assert not [r for r in rows if "FAILED" in r["method"]]
    for shape in ("48->40", "37->70"):
        timed = {r["method"] for r in rows if r["shape"] == shape and r["ms"] > 0}
        assert timed == {"frozen bf16 base", "peft LoRA", "fastft fused", "fastft fused, overlapped dA/dB"}, shape
        assert all(ms > 0 for ms in result["breakdown_ms"][shape].values()) and len(result["breakdown_ms"][shape]) == 10
    assert "## fastft kernel breakdown at r=16" in stdout


def test_shared_fraction_counts_the_side_time_inside_the_main_intervals():
    from fastft.apps.bench import shared_fraction

    mains = [(0.0, 10.0), (20.0, 30.0)]
    assert shared_fraction([(2.0, 4.0), (8.0, 12.0)], mains) == 4 / 6  # 2 + 2 of the 2 + 4 units inside
    assert shared_fraction([(10.0, 20.0)], mains) == 0.0  # took turns
    assert shared_fraction([(5.0, 25.0)], mains) == 0.5
    assert shared_fraction([], mains) is None


def test_kernel_ms_sums_each_fastft_kernel_and_lumps_torchs():
    """Per step: a kernel launched twice a step adds up; torch's own kernels (fills, elementwise) go under "torch"."""
    from fastft.apps.bench.harness import kernel_ms

    spans = [("_attn_bwd_dkdv_kernel", 0.0, 800.0), ("_attn_bwd_dkdv_kernel", 900.0, 1100.0),
             ("void at::native::vectorized_elementwise_kernel<4, FillFunctor>", 1100.0, 1150.0),
             ("_attn_bwd_delta_kernel", 1150.0, 1170.0), ("sm90_xmma_gemm_bf16", 1200.0, 1250.0)]
    parts = kernel_ms(spans, steps=2)
    assert parts == {"_attn_bwd_dkdv_kernel": 0.5, "torch": 0.05, "_attn_bwd_delta_kernel": 0.01}
