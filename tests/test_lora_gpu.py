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


@pytest.mark.parametrize("rank,fold", [(16, False), (16, True), (64, True)])
def test_each_descriptor_config_matches_fp64(monkeypatch, poison_cuda_allocator, rank, fold):
    """Each config the tuner may pick, forced one at a time, forward (W [N,K]) and dx (W seen transposed) against
    fp64, with a ragged M and N: tuning only keeps the fastest, so a wrong config would go unseen until it won.
    Three launches each: the warp-specialized configs this list once had wrote NaN into some launches only."""
    from fastft.kernels import lora_gemm

    dev, dtype, M, K, N = "cuda", torch.bfloat16, 1037, 1024, 1000
    a = torch.randn(M, K, device=dev).to(dtype)
    dy = torch.randn(M, N, device=dev).to(dtype)
    W = (torch.randn(N, K, device=dev) * K**-0.5).to(dtype)
    A = (torch.randn(rank, K, device=dev) * K**-0.5).to(dtype)
    B = (torch.randn(N, rank, device=dev) * 0.2).to(dtype)
    lo_x = (a.double() @ A.double().T).to(dtype)  # the split path's x·Aᵀ, as the kernel reads it
    lo_dy = (dy.double() @ B.double()).to(dtype)
    y_ref = a.double() @ W.double().T + 2.0 * lo_x.double() @ B.double().T
    dx_ref = dy.double() @ W.double() + 2.0 * lo_dy.double() @ A.double()
    configs = lora_gemm.gemm_configs(True, 2, rank if fold else 0)
    if not fold:  # and those the dx GEMM takes with the reductions beside it (FASTFT_LORA_OVERLAP)
        configs = configs + [c for c in lora_gemm.gemm_configs(True, 2, rank=rank, leave_room=True) if c not in configs]
    for config in 3 * configs:
        y = dx = lo = None  # the last config's outputs freed and poisoned: the next must not inherit their values
        poison_cuda_allocator()
        # one config: the tuner runs it untimed; a descriptor build failure would fall back to pointer loads
        monkeypatch.setattr(lora_gemm, "gemm_configs", lambda *args, config=config: [config])
        if fold:
            y, lo = lora_gemm.lora_gemm_folded(a, W, A, B, None, b_nk=True, scale=2.0)
            dx, _ = lora_gemm.lora_gemm_folded(dy, W, B, A, None, b_nk=False, scale=2.0)
            assert_close(lo, 2.0 * lo_x.double(), dtype, f"x·Aᵀ {config}")
            fold_y_ref = a.double() @ W.double().T + lo.double() @ B.double().T  # the tail the kernel rounded
            fold_dx_ref = dy.double() @ W.double() + (2.0 * lo_dy.double()).to(dtype).double() @ A.double()
            assert_close(y, fold_y_ref, dtype, f"forward {config}")
            assert_close(dx, fold_dx_ref, dtype, f"dx {config}")
        else:
            y = lora_gemm.lora_gemm(a, W, (2.0 * lo_x.double()).to(dtype), B, None, b_nk=True)
            dx = lora_gemm.lora_gemm(dy, W, (2.0 * lo_dy.double()).to(dtype), A, None, b_nk=False)
            assert_close(y, y_ref, dtype, f"forward {config}")
            assert_close(dx, dx_ref, dtype, f"dx {config}")
        assert "cuda" not in lora_gemm._NO_TMA, f"{config}: the descriptor kernel failed to build"
