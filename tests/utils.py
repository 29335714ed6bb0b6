"""Shared test helpers."""
import os

import pytest
import torch

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# Triton kernels on CPU tensors need the interpreter (set by conftest when there is no GPU).
interpreter_only = pytest.mark.skipif(not INTERPRET, reason="runs Triton kernels on the CPU via TRITON_INTERPRET=1")

# Relative error bounds per dtype (‖out − ref‖ / ‖ref‖ against an fp64 reference).
TOL = {torch.float32: 2e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    assert torch.isfinite(out).all(), "output has NaN/Inf"
    denom = ref.norm().item()
    return (out - ref).norm().item() / (denom if denom > 0 else 1.0)


def assert_close(out, ref, dtype, what=""):
    err = rel_err(out, ref)
    assert err <= TOL[dtype], f"{what}: relative error {err:.3e} > {TOL[dtype]:.1e} ({dtype})"
