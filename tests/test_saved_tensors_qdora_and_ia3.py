"""What autograd keeps between forward and backward (audit round 4): QDoRA's torch path (the CPU default; any
dropout > 0, on a GPU too) kept the dequantized dense W of every layer, where QLoRA's dequantizes it again in
backward (6.5 MB a SmolLM2 layer); the fused IA3 op kept the frozen W (under autocast its bf16 copy) when backward
did not read it (output scaling without dx), as LoRA's and DoRA's ops do not."""
import pytest
import torch
from torch.autograd.graph import saved_tensors_hooks

from fastft.ops.dora import dora_linear
from fastft.ops.ia3 import ia3_linear, ia3_linear_reference
from fastft.quant import quantize_nf4
from tests.utils import interpreter_only, rel_err

M, K, N, R = 16, 128, 96, 8


def _saved_shapes(fn):
    shapes = []

    def pack(t):
        shapes.append(tuple(t.shape))
        return t

    with saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, shapes


@pytest.mark.parametrize("dropout_p", [0.0, 0.1])
def test_qdora_torch_path_keeps_no_dense_weight(dropout_p):
    torch.manual_seed(0)
    w = quantize_nf4(torch.randn(N, K) / K**0.5, blocksize=64)
    x = torch.randn(M, K, requires_grad=True)
    A = (torch.randn(R, K) / K**0.5).requires_grad_()
    B = (torch.randn(N, R) * 0.1).requires_grad_()
    m = (torch.rand(N) + 0.5).requires_grad_()
    torch.manual_seed(1)
    y, shapes = _saved_shapes(lambda: dora_linear(x, w, None, A, B, m, 2.0, dropout_p, backend="torch"))
    assert (N, K) not in shapes and (K, N) not in shapes, shapes
    y.sum().backward()
    grads = [t.grad.clone() for t in (x, A, B, m)]
    for t in (x, A, B, m):
        t.grad = None
    dense = w.dequantize(torch.float32)
    torch.manual_seed(1)  # the same dropout mask: same draw order
    dora_linear(x, dense, None, A, B, m, 2.0, dropout_p, backend="torch").sum().backward()
    for got, t in zip(grads, (x, A, B, m)):
        assert torch.allclose(got, t.grad, rtol=1e-5, atol=1e-6)


@interpreter_only
def test_fused_ia3_keeps_no_weight_when_backward_does_not_read_it():
    torch.manual_seed(0)
    W = torch.randn(N, K) / K**0.5
    l = (1 + 0.1 * torch.randn(N, 1)).requires_grad_()
    x = torch.randn(M, K)  # no grad: layer 0's k/v under frozen embeddings
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, shapes = _saved_shapes(lambda: ia3_linear(x, W, None, l, feedforward=False, backend="triton"))
    assert (N, K) not in shapes, shapes
    y.float().sum().backward()
    got = l.grad.clone()
    l.grad = None
    l64 = l.detach().double().requires_grad_()
    want, = torch.autograd.grad(ia3_linear_reference(x.double(), W.double(), None, l64, feedforward=False).sum(), l64)
    assert rel_err(got.double(), want) < 2e-2  # bf16 operands
