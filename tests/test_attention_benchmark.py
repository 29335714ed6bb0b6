"""benchmarks/gpu_attention.py runs end to end (FASTFT_BENCH_SMOKE=1: CPU, Triton interpreter, toy sizes).

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
def test_gpu_attention_benchmark_smoke(tmp_path):
    env = dict(os.environ, FASTFT_BENCH_SMOKE="1", TRITON_INTERPRET="1", OUT=str(tmp_path))
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_attention.py")], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads((tmp_path / "attention.json").read_text())
    checks = [r for r in result["rows"] if r["section"] == "correctness"]
    assert checks and all(r["ok"] for r in checks), checks
    timed = {(r["section"], r.get("method"), r.get("layout")) for r in result["rows"] if "fwdbwd_ms" in r}
    assert ("dense", "fastft", None) in timed and ("packing", "fastft", "packed") in timed
    assert "### Packed vs padded" in run.stdout
