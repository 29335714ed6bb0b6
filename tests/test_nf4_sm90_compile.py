"""The NF4 and loss-row Triton kernels (tests/sm90_compile.py) compile for sm_90 (H100/H200) on this CPU-only
machine, without spilling."""
import pytest

from tests.sm90_runner import run_sm90_compile

pytest.importorskip("triton")


def test_nf4_kernels_compile_for_sm90():
    run_sm90_compile()
