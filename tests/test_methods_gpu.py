"""The method kernels on a real GPU (`pytest -m gpu` on the GPU machine): DoRA, IA3, the bottleneck adapter and
the column-dot reduction natively against fp64, and the DoRA / IA3 models against peft on CUDA."""
import peft
import pytest
import torch

import fastft
from fastft.ops import dora_linear, dora_linear_reference, ia3_linear, ia3_linear_reference
from fastft.ops.bottleneck_adapter import bottleneck_adapter, bottleneck_adapter_reference
from fastft.quant.nf4_weight import quantize_nf4
from tests.methods_utils import assert_same_step, copy_trainables, ids, perturb_trainables, step
from tests.utils import ALL_LINEAR, assert_close, tiny_llama

pytestmark = pytest.mark.gpu
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _grads_vs_fp64(fn, ref_fn, leaves, dtype):
    y = fn(*leaves)
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, leaves, dy)
    ref_leaves = [t.detach().to(dtype).double().requires_grad_() for t in leaves]
    y_ref = ref_fn(*ref_leaves)
    refs = torch.autograd.grad(y_ref, ref_leaves, dy.double())
    assert_close(y, y_ref, dtype, "y")
    for i, (g, r) in enumerate(zip(grads, refs)):
        assert_close(g, r, dtype, f"grad {i}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("nf4", [False, True])
def test_dora_op(dtype, nf4):
    M, K, N, r = 1037, 512, 384, 16
    W = (torch.randn(N, K, device="cuda") * K**-0.5).to(dtype)
    Wq = quantize_nf4(W.float(), blocksize=64) if nf4 else W
    Wd = Wq.dequantize(torch.float32).double() if nf4 else W.double()
    b = (torch.randn(N, device="cuda") * 0.1).to(dtype).requires_grad_()
    x = torch.randn(M, K, device="cuda").to(dtype).requires_grad_()
    A = (torch.randn(r, K, device="cuda") * K**-0.5).requires_grad_()
    B = (torch.randn(N, r, device="cuda") * 0.1).requires_grad_()
    m = (torch.rand(N, device="cuda") + 0.5).requires_grad_()
    _grads_vs_fp64(lambda x, b, A, B, m: dora_linear(x, Wq, b, A, B, m, 2.0),
                   lambda x, b, A, B, m: dora_linear_reference(x, Wd, b, A, B, m, 2.0), [x, b, A, B, m], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("feedforward", [False, True])
def test_ia3_op(dtype, feedforward):
    M, K, N = 1037, 512, 384
    W = (torch.randn(N, K, device="cuda") * K**-0.5).to(dtype)
    x = torch.randn(M, K, device="cuda").to(dtype).requires_grad_()
    b = (torch.randn(N, device="cuda") * 0.1).to(dtype).requires_grad_()
    l = (1 + 0.3 * torch.randn(K if feedforward else N, device="cuda")).requires_grad_()
    _grads_vs_fp64(lambda x, b, l: ia3_linear(x, W, b, l, feedforward=feedforward),
                   lambda x, b, l: ia3_linear_reference(x, W.double(), b, l, feedforward), [x, b, l], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_bottleneck_adapter_op(dtype):
    M, N, r = 1037, 576, 64
    leaves = [torch.randn(M, N, device="cuda").to(dtype).requires_grad_(),
              (torch.randn(r, N, device="cuda") * 0.1).requires_grad_(),
              (torch.randn(r, device="cuda") * 0.1).requires_grad_(),
              (torch.randn(N, r, device="cuda") * 0.1).requires_grad_(),
              (torch.randn(N, device="cuda") * 0.1).requires_grad_()]
    _grads_vs_fp64(lambda *t: bottleneck_adapter(*t, "gelu_tanh"),
                   lambda *t: bottleneck_adapter_reference(*t, "gelu_tanh"), leaves, dtype)


@pytest.mark.parametrize("kind", ["dora", "ia3"])
def test_models_match_peft_on_cuda(kind):
    config = (lambda: peft.LoraConfig(r=4, target_modules=ALL_LINEAR, use_dora=True)) if kind == "dora" else \
        (lambda: peft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]))
    ours = fastft.get_peft_model(tiny_llama().cuda(), config())
    theirs = peft.get_peft_model(tiny_llama().cuda(), config())
    perturb_trainables(ours)
    copy_trainables(ours, theirs)
    batch = ids().cuda()
    assert_same_step(step(ours, batch), step(theirs, batch), kind, tol=1e-4)
