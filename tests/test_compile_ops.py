"""Every fused op under torch.compile (fullgraph: no graph break) as its fastft:: custom op, giving what eager
gives, forward and backward; and torch.library.opcheck on the custom ops (schema, fake kernels against the real
ones, autograd registration). Triton through the interpreter on CPU (fastft.ops.compiled)."""
import pytest
import torch

from fastft.ops import rms_norm
from fastft.ops.rms_norm import rms_norm_backward_op, rms_norm_op
from tests.compile_utils import assert_compiles_like_eager
from tests.utils import interpreter_only

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _t(*shape, dtype=torch.float32, grad=True):
    return torch.randn(*shape, device=DEVICE, dtype=dtype).requires_grad_(grad)


@interpreter_only
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_compiles(with_residual):
    torch.manual_seed(0)
    x, w = _t(2, 5, 24), _t(24)
    if with_residual:
        res = _t(2, 5, 24)
        assert_compiles_like_eager(lambda x, w, r: rms_norm(x, w, residual=r, backend="triton"), x, w, res,
                                   ops=("rms_norm",))
    else:
        assert_compiles_like_eager(lambda x, w: rms_norm(x, w, offset=1.0, backend="triton"), x, w,
                                   ops=("rms_norm",))


@interpreter_only
def test_rms_norm_opcheck():
    torch.manual_seed(0)
    x, w, res = _t(3, 16), _t(16), _t(3, 16)
    torch.library.opcheck(rms_norm_op, (x, w, res, 1e-6, 0.0, "input"))
    torch.library.opcheck(rms_norm_op, (x, w, None, 1e-6, 1.0, "fp32"))
    h, rstd = x.detach(), torch.rand(3, device=DEVICE)
    torch.library.opcheck(rms_norm_backward_op, (torch.randn(3, 16), None, h, w.detach(), rstd, 0.0, True))


@interpreter_only
def test_rms_norm_compiles_with_dynamic_shapes():
    torch.manual_seed(1)
    x, w, res = _t(3, 7, 20), _t(20), _t(3, 7, 20)
    assert_compiles_like_eager(lambda x, w, r: rms_norm(x, w, 1e-5, residual=r, backend="triton"), x, w, res,
                               ops=("rms_norm",), dynamic=True)
