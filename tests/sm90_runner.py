"""Runs tests/sm90_compile.py in a subprocess (without TRITON_INTERPRET: it compiles for a real sm_90 target) and
fails the calling test when any kernel fails to compile, spills or exceeds shared memory."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_sm90_compile(*family: str) -> str:
    """The script's stdout; `family` selects a group ("lora", "attention", …), none the NF4 and loss-row kernels."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-m", "tests.sm90_compile", *family], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    return run.stdout
