"""The dense LoRA GEMM with the DoRA/IA3 scale features and the column-dot reduction compile for sm_90
(H100/H200) on this CPU-only machine, without spilling or exceeding shared memory, under the venv's triton and the
GPU machine's (tests/sm90_runner.py)."""
import pytest

from tests.sm90_runner import TRITONS, run_sm90_compile

pytest.importorskip("triton")


@pytest.mark.parametrize("triton_path", TRITONS)
def test_method_kernels_compile_for_sm90(triton_path):
    run_sm90_compile("lora", triton_path=triton_path)
