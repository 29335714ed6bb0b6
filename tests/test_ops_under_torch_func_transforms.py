"""torch.func transforms (grad, vmap, jvp) and forward-mode AD through fastft's ops: the Triton kernels and the NF4
torch matmul are autograd Functions with no vmap or jvp rule, and failed with torch's generic "must override the
setup_context staticmethod" (or, for DoRA's row norm, an autotuner's "no launch config compiled") where peft's
layers run. backend="auto" now runs plain torch ops under a transform, the NF4 torch path takes its reference
there, and backend="triton" is refused naming the transform."""
import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F

from fastft.ops import lora_linear, nf4_linear, qlora_linear, shared
from fastft.quant import quantize_nf4
from tests.utils import interpreter_only


def _operands():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 64, generator=g)
    qweight = quantize_nf4(torch.randn(16, 64, generator=g) / 8, blocksize=32)
    A, B = torch.randn(2, 64, generator=g) / 8, torch.randn(16, 2, generator=g) / 4
    return x, qweight, A, B


def test_nf4_linear_under_func_grad_vmap_and_jvp_matches_its_reference():
    x, qweight, _, _ = _operands()
    W = qweight.dequantize(torch.float32)
    got = torch.func.grad(lambda t: nf4_linear(t, qweight, backend="torch").pow(2).sum())(x)
    want = torch.func.grad(lambda t: F.linear(t, W).pow(2).sum())(x)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(torch.vmap(lambda row: nf4_linear(row, qweight))(x), F.linear(x, W))
    _, tangent = torch.func.jvp(lambda t: nf4_linear(t, qweight), (x,), (torch.ones_like(x),))
    torch.testing.assert_close(tangent, F.linear(torch.ones_like(x), W))


def test_qlora_linear_grad_of_a_factor_under_func_grad():
    x, qweight, A, B = _operands()
    W = qweight.dequantize(torch.float32)
    got = torch.func.grad(lambda a: qlora_linear(x, qweight, None, a, B, 0.5).sum())(A)
    want = torch.func.grad(lambda a: (F.linear(x, W) + 0.5 * F.linear(F.linear(x, a), B)).sum())(A)
    torch.testing.assert_close(got, want)


def test_nf4_linear_under_forward_mode_ad():
    x, qweight, _, _ = _operands()
    with fwAD.dual_level():
        out = nf4_linear(fwAD.make_dual(x, torch.ones_like(x)), qweight)
        tangent = fwAD.unpack_dual(out).tangent
    torch.testing.assert_close(tangent, F.linear(torch.ones_like(x), qweight.dequantize(torch.float32)))


def test_auto_takes_torch_under_a_transform_even_where_triton_runs(monkeypatch):
    monkeypatch.setattr(shared, "triton_runs_on", lambda device: True)
    cuda = torch.device("cuda")
    assert shared.resolve_backend("op", "auto", cuda) == "triton"
    seen = []
    torch.func.grad(lambda t: (seen.append(shared.resolve_backend("op", "auto", cuda)), t.sum())[1])(torch.ones(2))
    assert seen == ["torch"]


@interpreter_only
def test_triton_backend_under_a_transform_is_refused_naming_it(monkeypatch):
    x, _, A, B = _operands()
    W = torch.randn(16, 64)
    with pytest.raises(ValueError, match=r"lora_linear: backend='triton' runs under no torch.func transform"):
        torch.func.grad(lambda a: lora_linear(x, W, None, a, B, 0.5, backend="triton").sum())(A)
    monkeypatch.setenv("FASTFT_LORA_BACKEND", "triton")  # the layers' setting is named where it may be the cause
    with pytest.raises(ValueError, match=r"backend='triton' \(FASTFT_LORA_BACKEND=triton, for fastft's LoRA layers\)"):
        torch.func.jvp(lambda t: lora_linear(t, W, None, A, B, 0.5, backend="triton"), (x,), (x,))
