"""benchmarks/gpu_sanitize.py (compute-sanitizer's workload in `gpu_check.sh sanitize`): its calls run, here on the
Triton interpreter (`--device cpu`), so that no GPU time is spent on a script error; an unknown case is named."""
import os
import subprocess
import sys
from pathlib import Path

from tests.utils import interpreter_only

ROOT = Path(__file__).resolve().parents[1]


def _run(*args):
    env = dict(os.environ, TRITON_INTERPRET="1")
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_sanitize.py"), *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)


@interpreter_only
def test_sanitizer_workload_runs_on_the_interpreter():
    run = _run("--device", "cpu", "--cases", "dora,attention")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "dora: ok" in run.stdout and "attention: ok" in run.stdout


def test_an_unknown_case_is_named():
    run = _run("--device", "cpu", "--cases", "lora,nope")
    assert run.returncode == 2 and "--cases: unknown nope" in run.stderr
