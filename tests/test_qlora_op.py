"""fastft.ops.qlora_linear / nf4_linear: forward and every gradient against fp64, dropout, dispatch, bad inputs."""
import pytest
import torch

from fastft.ops import lora_linear_reference, nf4_linear, qlora_linear, qlora_linear_reference
from fastft.quant import quantize_nf4
from tests.utils import assert_close, check_nf4_linear_fp64, interpreter_only

# (M, K, N, r, blocksize, double_quant, dropout_p): ragged sizes, every blocksize path, x as 2-D or 3-D
CASES = [
    ((37,), 64, 48, 4, 64, True, 0.0),
    ((2, 50), 128, 70, 8, 32, False, 0.1),
    ((5,), 256, 33, 16, 128, True, 0.25),
    ((3, 7), 96, 100, 20, 32, True, 0.0),
]


def _fp64_reference(x, w, bias, A, B, scaling, p, keep):
    leaves = [t.detach().double().requires_grad_() for t in (x, A, B, bias)]
    x64, A64, B64, b64 = leaves
    y = lora_linear_reference(x64, w.dequantize(torch.float32).double(), b64, A64, B64, scaling, p,
                              keep_mask=keep)
    return y, leaves


@interpreter_only
@pytest.mark.parametrize("dtype", (torch.float32, torch.float16, torch.bfloat16))
@pytest.mark.parametrize("lead,K,N,r,blocksize,double_quant,p", CASES)
def test_forward_and_gradients_match_fp64(captured_seeds, dtype, lead, K, N, r, blocksize, double_quant, p):
    from fastft.kernels.rank_ops import dropout_mask
    w = quantize_nf4(torch.randn(N, K, dtype=dtype) * 0.05, blocksize=blocksize, double_quant=double_quant)
    x = torch.randn(*lead, K, dtype=dtype, requires_grad=True)
    A = (torch.randn(r, K) * 0.1).requires_grad_()  # fp32 masters, as peft keeps them
    B = (torch.randn(N, r) * 0.1).requires_grad_()
    bias = torch.randn(N, dtype=dtype, requires_grad=True)
    seeds = captured_seeds
    y = qlora_linear(x, w, bias, A, B, 2.0, p, backend="triton")
    dy = torch.randn_like(y)
    y.backward(dy)
    keep = None
    if p > 0:
        assert len(seeds) == 1
        keep = dropout_mask(seeds[0], x[..., 0].numel(), K, p, "cpu").view(x.shape)
    y_ref, (x64, A64, B64, b64) = _fp64_reference(x, w, bias, A, B, 2.0, p, keep)
    y_ref.backward(dy.double())
    assert y.dtype == dtype and y.shape == (*lead, N)
    assert_close(y, y_ref, dtype, "y")
    assert_close(x.grad, x64.grad, dtype, "dx")
    assert_close(bias.grad, b64.grad, dtype, "db")
    assert A.grad.dtype == torch.float32 and B.grad.dtype == torch.float32
    assert_close(A.grad, A64.grad, dtype, "dA")
    assert_close(B.grad, B64.grad, dtype, "dB")


@interpreter_only
def test_non_contiguous_input_and_no_bias():
    w = quantize_nf4(torch.randn(40, 64) * 0.05)
    x = torch.randn(64, 30).t().requires_grad_()
    A, B = torch.randn(8, 64) * 0.1, torch.randn(40, 8) * 0.1
    A.requires_grad_()
    y = qlora_linear(x, w, None, A, B, 0.5, backend="triton")
    y.sum().backward()
    ref = qlora_linear_reference(x.detach(), w, None, A.detach(), B, 0.5)
    assert_close(y, ref, torch.float32, "y")
    W = w.dequantize()
    assert_close(x.grad, torch.ones(30, 40) @ (W + 0.5 * B @ A.detach()), torch.float32, "dx")


@interpreter_only
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_nf4_linear_forward_and_gradients(dtype):
    check_nf4_linear_fp64((2, 9), dtype)


@interpreter_only
def test_rows_without_whole_blocks_fall_back_to_dense():
    # in_features 100 is not a multiple of the blocksize: dequantize, then the dense fused LoRA op
    w = quantize_nf4(torch.randn(20, 100) * 0.05, blocksize=64)
    x = torch.randn(9, 100)
    A, B = torch.randn(4, 100), torch.randn(20, 4)
    y = qlora_linear(x, w, None, A, B, 1.0, backend="triton")
    assert_close(y, qlora_linear_reference(x, w, None, A, B, 1.0), torch.float32, "y")
    assert_close(nf4_linear(x, w, backend="triton"), x @ w.dequantize().T, torch.float32, "nf4_linear")


def test_cpu_default_is_the_reference():
    w = quantize_nf4(torch.randn(16, 64))
    x = torch.randn(3, 64)
    A, B = torch.randn(2, 64), torch.randn(16, 2)
    assert torch.equal(qlora_linear(x, w, None, A, B, 1.5), qlora_linear_reference(x, w, None, A, B, 1.5))


def _saved_sizes(fn):
    """The shapes of the tensors autograd keeps for backward while `fn()` runs its forward."""
    shapes = []

    def pack(t):
        shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, shapes


@pytest.mark.parametrize("op, K, backend", [("qlora", 128, "torch"), ("nf4", 128, "torch"), ("nf4", 96, "triton")])
def test_the_dense_weight_is_not_kept_for_backward(op, K, backend):
    """Autograd through F.linear(x, W.dequantize()) kept the dense W of every layer until backward: QLoRA on the
    CPU (torch backend) held more than plain LoRA (13.5 MiB a SmolLM2 layer in fp32). W is dequantized again in
    backward; values and gradients are the reference's."""
    torch.manual_seed(0)
    w = quantize_nf4(torch.randn(48, K) * 0.05, blocksize=64)
    bias = torch.randn(48, requires_grad=True)
    A, B = torch.randn(4, K, requires_grad=True), torch.randn(48, 4, requires_grad=True)
    x = torch.randn(5, 3, K, requires_grad=True)
    if op == "qlora":
        args, fast, reference = (x, w, bias, A, B, 1.5), qlora_linear, qlora_linear_reference
    else:
        args, fast, reference = (x, w, bias), nf4_linear, lambda *a: x @ w.dequantize().T + bias
    y, shapes = _saved_sizes(lambda: fast(*args, backend=backend))
    assert (48, K) not in shapes and (K, 48) not in shapes, shapes
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, [t for t in args if isinstance(t, torch.Tensor) and t.requires_grad], dy)
    y_ref = reference(*args)
    ref = torch.autograd.grad(y_ref, [t for t in args if isinstance(t, torch.Tensor) and t.requires_grad], dy)
    assert_close(y, y_ref, torch.float32, "y")
    for got, want in zip(grads, ref):
        assert_close(got, want, torch.float32, "grad")


def test_bad_inputs_are_named():
    w = quantize_nf4(torch.randn(16, 64))
    x, A, B = torch.randn(3, 64), torch.randn(2, 64), torch.randn(16, 2)
    with pytest.raises(ValueError, match="qweight"):
        qlora_linear(x, w.dequantize(), None, A, B, 1.0)
    with pytest.raises(ValueError, match="`x` has 32 features"):
        qlora_linear(torch.randn(3, 32), w, None, A, B, 1.0)
    with pytest.raises(ValueError, match="lora_A"):
        qlora_linear(x, w, None, torch.randn(2, 63), B, 1.0)
    with pytest.raises(ValueError, match="lora_B"):
        qlora_linear(x, w, None, A, torch.randn(15, 2), 1.0)
    with pytest.raises(ValueError, match="bias"):
        qlora_linear(x, w, torch.randn(15), A, B, 1.0)
    with pytest.raises(ValueError, match="dropout_p"):
        qlora_linear(x, w, None, A, B, 1.0, 1.0)
    with pytest.raises(ValueError, match="scaling"):
        qlora_linear(x, w, None, A, B, float("nan"))
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        qlora_linear(x.double(), w, None, A, B, 1.0)
    with pytest.raises(ValueError, match="2-D"):
        nf4_linear(x, quantize_nf4(torch.randn(4, 4, 64)))
    with pytest.raises(ValueError, match="backend"):
        nf4_linear(x, w, backend="cuda")
