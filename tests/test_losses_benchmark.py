"""benchmarks/gpu_losses.py runs end to end (FASTFT_BENCH_SMOKE=1: CPU, Triton interpreter, toy sizes).

The GPU run is the lead's; this only catches script errors before GPU time is spent on them.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

from tests.utils import interpreter_only

ROOT = Path(__file__).resolve().parents[1]


@interpreter_only
def test_gpu_losses_benchmark_smoke(tmp_path):
    env = dict(os.environ, FASTFT_BENCH_SMOKE="1", TRITON_INTERPRET="1", OUT=str(tmp_path))
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_losses.py")], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads((tmp_path / "losses.json").read_text())
    assert result["correctness_failures"] == []
    methods = [r["method"] for r in result["ce"]]
    assert methods[0].startswith("torch") and "fastft (default chunk)" in methods and all("ms" in r for r in result["ce"])
    assert [r["method"] for r in result["kl"]] == ["torch KL (logits materialised)", "fastft linear_kl_div"]
    assert "## linear + cross-entropy" in run.stdout
