"""The NF4 and loss-row Triton kernels (tests/sm90_compile.py) compile for sm_90 (H100/H200) on this CPU-only
machine, without spilling."""
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")


def test_nf4_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run = subprocess.run([sys.executable, "-m", "tests.sm90_compile"], cwd=root, env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
