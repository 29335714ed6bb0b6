"""The NF4 and loss-row Triton kernels (tests/sm90_compile.py) compile for sm_90 (H100/H200) on this CPU-only
machine, without spilling, under the venv's triton and the GPU machine's (tests/sm90_runner.py)."""
import pytest

from tests.sm90_runner import TRITONS, run_sm90_compile

pytest.importorskip("triton")


@pytest.mark.parametrize("triton_path", TRITONS)
def test_nf4_kernels_compile_for_sm90(triton_path):
    run_sm90_compile(triton_path=triton_path)
