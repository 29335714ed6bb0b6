"""The dense LoRA GEMM with the DoRA/IA3 scale features and the column-dot reduction compile for sm_90
(H100/H200) on this CPU-only machine, without spilling or exceeding shared memory."""
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")


def test_method_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run = subprocess.run([sys.executable, "-m", "tests.sm90_compile", "lora"], cwd=root, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
