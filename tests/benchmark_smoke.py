"""Runs a benchmarks/gpu_*.py script end to end in smoke mode (FASTFT_BENCH_SMOKE=1: CPU, Triton interpreter, toy
sizes). The GPU runs are the lead's; the smoke tests only catch script errors before GPU time is spent on them."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_benchmark_smoke(script: str, results_file: str, out_dir: Path, *args: str) -> tuple[dict, str]:
    """(the JSON results the script wrote under $OUT, its stdout); fails the test when the script fails."""
    env = dict(os.environ, FASTFT_BENCH_SMOKE="1", TRITON_INTERPRET="1", OUT=str(out_dir))
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return json.loads((out_dir / results_file).read_text()), run.stdout
