"""chunked_logits.add_product: the fused losses' fp32 accumulation of half-precision products (dW, dA, dB).

It used to round each chunk's fp16 product to fp16, shrunk by 2^-ceil(log2 n) against overflow: products of
~1e-4 (dB early in training) fell into fp16's subnormals and came out 2% off (found by the N=100 fuzz campaign,
docs/fuzz-results.md). Now the GEMM's fp32 sums stay fp32: entry-wise within fp32's summation bound."""
import pytest
import torch

from fastft.ops import chunked_logits
from fastft.ops.chunked_logits import add_product


def _check(acc0, a, b, alpha):
    acc = acc0.clone()  # on a's device: CUDA makes the product with cuBLAS's fp32 output (mm's out_dtype)
    add_product(acc, a, b, alpha)
    acc, acc0, a, b = acc.cpu(), acc0.cpu(), a.cpu(), b.cpu()
    want = acc0.double() + alpha * (a.double() @ b.double())
    n = a.shape[1]
    # each product exact in fp32; the fp32 sum, the alpha multiply and the add: (n + 2)·2^-24 of Σ|terms|
    bound = (n + 2) * 2.0**-24 * (acc0.double().abs() + abs(alpha) * (a.double().abs() @ b.double().abs()))
    assert torch.isfinite(acc).all()
    excess = ((acc.double() - want).abs() / bound.clamp_min(1e-300)).max().item()
    assert excess <= 1.0, excess


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("scale", [1e-2, 1.0, 300.0])  # 1e-2: products ~1e-4 (fp16 subnormal sums); 300: sums >> 65504
def test_add_product_half_keeps_fp32(device, dtype, scale):
    g = torch.Generator().manual_seed(7)
    n = 37
    # a as the callers pass it: a transposed view (dlogitsᵀ, uᵀ)
    a = (torch.randn(n, 23, generator=g) * scale).to(dtype).t().to(device)
    b = (torch.randn(n, 19, generator=g) * scale).to(dtype).to(device)
    acc0 = (torch.randn(23, 19, generator=g) * scale * scale).to(device)
    _check(acc0, a, b, 0.37)
    _check(torch.zeros(23, 19, device=device), a, b, 1.0)


def test_add_product_fp16_small_products_exact_to_fp32():
    """The fuzz finding's shape: all products ~1e-4·1e-2, n = 32 (the old shrink 2^-5 made them subnormal)."""
    g = torch.Generator().manual_seed(0)
    a = (torch.rand(15, 32, generator=g) * 1e-2).half()
    b = (torch.rand(32, 15, generator=g) * 1e-2).half()
    _check(torch.zeros(15, 15), a, b, 0.5)


def test_add_product_in_row_blocks(monkeypatch):
    """A scratch smaller than one product: made block by block, every row written once."""
    monkeypatch.setattr(chunked_logits, "PRODUCT_SCRATCH_MIB", 0)  # one row a block
    g = torch.Generator().manual_seed(3)
    a = torch.randn(11, 29, generator=g).half()
    b = torch.randn(29, 5, generator=g).half()
    _check(torch.randn(11, 5, generator=g), a, b, 2.0)


def test_add_product_fp32_and_fp64_unchanged():
    g = torch.Generator().manual_seed(5)
    for dtype in (torch.float32, torch.float64):
        a = torch.randn(9, 13, generator=g, dtype=dtype)
        b = torch.randn(13, 4, generator=g, dtype=dtype)
        acc = torch.zeros(9, 4, dtype=dtype)
        add_product(acc, a, b, 3.0)
        torch.testing.assert_close(acc, 3.0 * (a @ b))


def test_deferred_backward_under_autocast_keeps_fp32_products():
    """reduction "none" recomputes the chunks in backward; a backward called inside torch.autocast (as a training
    step under autocast does) made add_product's fp32 GEMMs fp16 ones: dW differed from the same backward outside
    autocast, and from the compiled door (found by the fuzz at H = 1, V = 2, one row a chunk)."""
    from fastft.ops import linear_cross_entropy

    g = torch.Generator().manual_seed(11)
    h = torch.randn(6, 1, generator=g).requires_grad_()
    W = (torch.randn(2, 1, generator=g) * 0.3).requires_grad_()
    labels = torch.randint(0, 2, (6,), generator=g)
    grads = []
    for inside in (True, False):
        with torch.autocast("cpu", dtype=torch.float16):
            rows = linear_cross_entropy(h, W, labels, reduction="none", backend="torch", chunk_size=1)
            if inside:
                grads.append(torch.autograd.grad(rows, (h, W), torch.ones_like(rows)))
        if not inside:
            grads.append(torch.autograd.grad(rows, (h, W), torch.ones_like(rows)))
    for a, b in zip(*grads):
        assert torch.equal(a, b), (a - b).abs().max()


class _CudaLike:
    """What fp32_output_gemm reads of a tensor."""

    def __init__(self, dtype):
        self.is_cuda, self.dtype = True, dtype


def test_fp32_output_gemm_where_torch_allows_it(monkeypatch):
    """torch refuses an fp32 output of fp16 operands under allow_fp16_accumulation: fp32 operands then, not an error
    in every fused-loss backward of a user who set it."""
    from fastft.ops.chunked_logits import fp32_output_gemm

    monkeypatch.setattr(chunked_logits, "_MM_HAS_OUT_DTYPE", True)
    assert fp32_output_gemm(_CudaLike(torch.float16)) and fp32_output_gemm(_CudaLike(torch.bfloat16))
    assert not fp32_output_gemm(torch.zeros(1, dtype=torch.float16))  # the CPU: fp32 operands
    matmul = torch.backends.cuda.matmul  # a module of properties: monkeypatch cannot restore it
    matmul.allow_fp16_accumulation = True
    try:
        assert not fp32_output_gemm(_CudaLike(torch.float16))
        assert fp32_output_gemm(_CudaLike(torch.bfloat16))
    finally:
        matmul.allow_fp16_accumulation = False
    monkeypatch.setattr(chunked_logits, "_MM_HAS_OUT_DTYPE", False)  # a torch without mm's out_dtype
    assert not fp32_output_gemm(_CudaLike(torch.bfloat16))


@pytest.mark.gpu
def test_add_product_fp16_under_fp16_accumulation_gpu():
    matmul = torch.backends.cuda.matmul
    matmul.allow_fp16_accumulation = True
    try:
        g = torch.Generator().manual_seed(9)
        a = (torch.randn(23, 37, generator=g) * 1e-2).half().cuda()
        b = (torch.randn(37, 19, generator=g) * 1e-2).half().cuda()
        _check(torch.zeros(23, 19, device="cuda"), a, b, 0.5)
    finally:
        matmul.allow_fp16_accumulation = False


@pytest.mark.parametrize("per_row", [True, False])
@pytest.mark.parametrize("in_place", [True, False])
def test_times_in_fp32_in_row_chunks_equals_one_pass(monkeypatch, per_row, in_place):
    """Above _FP32_TEMP elements the product is made a chunk of rows at a time (bounded fp32 temporaries): each
    row must meet its own factor (distinct factors here; the losses' tests scale every row alike)."""
    from fastft.ops.chunked_logits import times_in_fp32

    g = torch.Generator().manual_seed(2)
    t = torch.randn(13, 7, generator=g).half()
    factor = torch.rand(13, 1, generator=g) + 0.5 if per_row else torch.tensor([0.37])
    want = (t.float() * factor).half()
    monkeypatch.setattr(chunked_logits, "_FP32_TEMP", 20)  # 2 rows a chunk: 7 chunks, the last ragged
    if in_place:
        buf = t.clone()
        got = times_in_fp32(buf, factor, torch.float16, out=buf)
        assert got.data_ptr() == buf.data_ptr()
    else:
        got = times_in_fp32(t, factor, torch.float16)
    assert torch.equal(got, want)
