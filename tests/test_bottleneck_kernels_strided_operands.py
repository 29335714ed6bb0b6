"""The bottleneck adapter's two kernels at the launcher level, on operands with a non-unit column stride.

`down_act` and `up_residual` take h / res through both of their strides, but the op (fastft.ops.bottleneck_adapter)
always hands them contiguous rows, so nothing else reads those column strides: a kernel that assumed a unit
column stride would pass every op test and break the first caller that passes a column slice or a transpose.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.utils import assert_close, interpreter_only

pytestmark = interpreter_only

ACT = {"relu": F.relu, "silu": F.silu, "gelu_tanh": lambda p: F.gelu(p, approximate="tanh"), "tanh": torch.tanh}


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
@pytest.mark.parametrize("activation", ["silu", "relu"])
def test_down_act_on_a_transposed_h(dtype, activation):
    from fastft.kernels.bottleneck_adapter import down_act

    M, N, R = 45, 70, 16  # ragged against the interpreter's 32 x 32 tiles
    h = torch.randn(N, M, dtype=dtype).t()  # (M, N) with strides (1, M)
    d = (torch.randn(R, N) * 0.2).to(dtype)
    bias = torch.randn(R)
    z, p = down_act(h, d, bias, activation)
    p_ref = h.double() @ d.double().T + bias.double()
    assert_close(p, p_ref, dtype, "p")
    assert_close(z, ACT[activation](p_ref), dtype, "z")


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_up_residual_on_a_transposed_residual(dtype):
    from fastft.kernels.bottleneck_adapter import up_residual

    M, N, R = 45, 70, 16
    res = torch.randn(N, M, dtype=dtype).t()  # (M, N) with strides (1, M)
    lo = torch.randn(M, R, dtype=dtype)
    t = torch.randn(R, N, dtype=dtype).t()  # logical (N, R), strides (1, N): dh's Dᵀ
    bias = torch.randn(N, dtype=dtype)
    out = up_residual(res, lo, t, bias)
    assert out.shape == (M, N)
    assert_close(out, res.double() + lo.double() @ t.double().T + bias.double(), dtype, "res + lo·tᵀ + b")
