"""The dense LoRA GEMM with the DoRA/IA3 scale features and the column-dot reduction compile for sm_90
(H100/H200) on this CPU-only machine, without spilling or exceeding shared memory."""
import pytest

from tests.sm90_runner import run_sm90_compile

pytest.importorskip("triton")


def test_method_kernels_compile_for_sm90():
    run_sm90_compile("lora")
