"""The fused LoRA linear on a real GPU (`pytest -m gpu` on the GPU machine): Triton kernels natively,
against an fp64 reference, with the allocator poisoned so unwritten outputs show up as NaN."""
import pytest
import torch

from fastft.ops import lora_linear, lora_linear_reference
from tests.utils import assert_close

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("poison_cuda_allocator")]


def _run(M, K, N, r, dtype, *, p=0.0, bias=True, adapter_dtype=None, batch=(), seeds=None):
    dev = "cuda"
    x = torch.randn(*batch, M, K, device=dev).to(dtype).requires_grad_()
    W = (torch.randn(N, K, device=dev) * K**-0.5).to(dtype)
    b = (torch.randn(N, device=dev) * 0.1).to(dtype).requires_grad_() if bias else None
    A = (torch.randn(r, K, device=dev) * K**-0.5).to(adapter_dtype or dtype).requires_grad_()
    B = (torch.randn(N, r, device=dev) * 0.2).to(adapter_dtype or dtype).requires_grad_()
    y = lora_linear(x, W, b, A, B, 2.0, p)
    dy = torch.randn_like(y)
    y.backward(dy)
    mask = None
    if p > 0:
        from fastft.kernels.rank_ops import dropout_mask

        mask = dropout_mask(seeds[0], x.numel() // K, K, p, dev).view(x.shape)
    leaves = {k: v.detach().double().requires_grad_(v.requires_grad)
              for k, v in dict(x=x, b=b, A=A, B=B).items() if v is not None}
    y_ref = lora_linear_reference(leaves["x"], W.double(), leaves.get("b"), leaves["A"], leaves["B"], 2.0, p,
                                  keep_mask=mask)
    y_ref.backward(dy.double())
    assert_close(y, y_ref, dtype, "y")
    for name, leaf in leaves.items():
        got = dict(x=x, b=b, A=A, B=B)[name].grad
        assert_close(got, leaf.grad, dtype, f"d{name}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(1037, 512, 384, 16), (300, 4096, 1000, 8), (64, 1024, 4096, 64), (1, 256, 128, 5)])
def test_matches_fp64(dtype, shape):
    _run(*shape, dtype)


def test_unaligned_k_takes_pointer_path():
    _run(513, 1001, 333, 16, torch.bfloat16)


def test_dropout_mask_is_regenerated_consistently(captured_seeds):
    _run(777, 1024, 512, 16, torch.bfloat16, p=0.1, batch=(2,), seeds=captured_seeds)


def test_fp32_adapters_on_bf16_base():
    _run(512, 2048, 768, 16, torch.bfloat16, adapter_dtype=torch.float32, bias=False)


def test_large_training_shape():
    _run(4096, 4096, 4096, 16, torch.bfloat16)


@pytest.fixture
def fold_path(monkeypatch):
    from fastft.ops import lora_path

    monkeypatch.setenv(lora_path.ENV, "fold")


@pytest.mark.parametrize("case", [
    (1037, 512, 384, 16, torch.bfloat16), (1037, 512, 384, 16, torch.float16), (1037, 512, 384, 16, torch.float32),
    (300, 4096, 1000, 8, torch.bfloat16), (64, 1024, 4096, 64, torch.bfloat16), (1, 256, 128, 5, torch.bfloat16),
    (513, 1001, 333, 33, torch.bfloat16),  # unaligned K: the pointer-load variant
])
def test_fold_matches_fp64(case, fold_path):
    *shape, dtype = case
    _run(*shape, dtype)


def test_fold_dropout_and_fp32_adapters(fold_path, captured_seeds):
    _run(777, 1024, 512, 16, torch.bfloat16, p=0.1, batch=(2,), seeds=captured_seeds)
    _run(512, 2048, 768, 16, torch.bfloat16, adapter_dtype=torch.float32, bias=False)
