"""The fused LoRA linear op (Triton, through the interpreter on CPU) against an fp64 reference:
forward and every gradient over fuzzed shapes, dtypes, strides and dropout."""
import random

import pytest
import torch

from fastft.ops import lora_linear, lora_linear_reference
from tests.utils import TOL, assert_close, interpreter_only, rel_err

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _inputs(M, K, N, r, dtype, *, bias=True, batch=(), adapter_dtype=None, scale=0.2):
    adapter_dtype = adapter_dtype or dtype
    x = torch.randn(*batch, M, K).to(dtype).requires_grad_()
    W = (torch.randn(N, K) * K**-0.5).to(dtype)
    b = (torch.randn(N) * 0.1).to(dtype).requires_grad_() if bias else None
    A = (torch.randn(r, K) * K**-0.5).to(adapter_dtype).requires_grad_()
    B = (torch.randn(N, r) * scale).to(adapter_dtype).requires_grad_()
    return x, W, b, A, B


def _reference(x, W, b, A, B, s, p=0.0, keep_mask=None, dy=None):
    """fp64 forward and gradients of every input that requires grad."""
    leaves = {k: v.detach().double().requires_grad_(v.requires_grad)
              for k, v in dict(x=x, W=W, b=b, A=A, B=B).items() if v is not None}
    y = lora_linear_reference(leaves["x"], leaves["W"], leaves.get("b"), leaves["A"], leaves["B"], s, p,
                              keep_mask=keep_mask)
    y.backward(dy.double())
    return y, {k: v.grad for k, v in leaves.items() if v.requires_grad}


def _check_against_reference(x, W, b, A, B, s, p=0.0, seeds=None):
    dtype = x.dtype
    y = lora_linear(x, W, b, A, B, s, p, backend="triton")
    assert y.dtype == dtype and y.shape == (*x.shape[:-1], W.shape[0])
    dy = torch.randn_like(y)
    y.backward(dy)
    mask = None
    if p > 0:
        from fastft.kernels.rank_ops import dropout_mask

        mask = dropout_mask(seeds[0], x.numel() // x.shape[-1], x.shape[-1], p, x.device).view(x.shape)
    y_ref, grads = _reference(x, W, b, A, B, s, p, mask, dy)
    assert_close(y, y_ref, dtype, "y")
    got = dict(x=x, W=W, b=b, A=A, B=B)
    for name, ref in grads.items():
        grad = got[name].grad
        assert grad is not None and grad.dtype == got[name].dtype, f"d{name} missing or wrong dtype"
        assert_close(grad, ref, dtype, f"d{name}")


@interpreter_only
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", range(6))
def test_fuzzed_shapes_forward_and_grads(dtype, case):
    rng = random.Random(1000 * case + DTYPES.index(dtype))
    M = rng.choice([1, 7, 37, 100])
    K = rng.choice([16, 37, 64, 100]) if dtype == torch.float32 else rng.choice([16, 40, 64, 96])
    N = rng.choice([1, 24, 48, 70])
    r = rng.choice([1, 5, 8, 16, 40])
    bias = rng.random() < 0.5
    x, W, b, A, B = _inputs(M, K, N, r, dtype, bias=bias)
    _check_against_reference(x, W, b, A, B, s=rng.choice([0.5, 2.0]))


@interpreter_only
def test_odd_k_half_precision_takes_pointer_path():
    # K=37 in bf16: rows are 74 bytes, not 16-byte aligned, so descriptors are impossible.
    x, W, b, A, B = _inputs(45, 37, 29, 6, torch.bfloat16)
    _check_against_reference(x, W, b, A, B, s=2.0)


@interpreter_only
def test_leading_batch_dims():
    x, W, b, A, B = _inputs(5, 48, 40, 8, torch.float32, batch=(2, 3))
    _check_against_reference(x, W, b, A, B, s=1.5)


@interpreter_only
def test_non_contiguous_inputs():
    base = torch.randn(70, 2 * 48)
    x = base[:, ::2].requires_grad_()  # strided columns
    assert not x.is_contiguous()
    W = torch.randn(48, 40).t() * 0.2  # transposed weight view (N×K, column-major)
    A = (torch.randn(48, 6) * 0.2).t().requires_grad_()
    B = (torch.randn(6, 40) * 0.2).t().requires_grad_()
    b = torch.randn(40).requires_grad_()
    _check_against_reference(x, W, b, A, B, s=2.0)


@interpreter_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fp32_adapter_weights_with_half_base(dtype):
    # peft keeps adapter weights in fp32 on a bf16/fp16 model; gradients must come back in fp32.
    x, W, b, A, B = _inputs(33, 64, 48, 16, dtype, adapter_dtype=torch.float32)
    _check_against_reference(x, W, b, A, B, s=2.0)


@interpreter_only
def test_weight_gradient_when_base_trains():
    x, W, b, A, B = _inputs(20, 32, 24, 4, torch.float32)
    W.requires_grad_()
    _check_against_reference(x, W, b, A, B, s=1.0)


@interpreter_only
def test_only_adapter_grads_when_input_is_frozen():
    x, W, b, A, B = _inputs(20, 32, 24, 4, torch.float32, bias=False)
    x.requires_grad_(False)
    _check_against_reference(x, W, b, A, B, s=1.0)
    assert x.grad is None


@interpreter_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dropout_matches_reference_with_regenerated_mask(dtype, captured_seeds):
    x, W, b, A, B = _inputs(50, 64, 36, 6, dtype)
    _check_against_reference(x, W, b, A, B, s=2.0, p=0.3, seeds=captured_seeds)
    assert len(captured_seeds) == 1


@interpreter_only
def test_dropout_ragged_shape(captured_seeds):
    x, W, b, A, B = _inputs(37, 37, 19, 3, torch.float32, batch=(2,))
    _check_against_reference(x, W, b, A, B, s=1.0, p=0.1, seeds=captured_seeds)


@interpreter_only
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_mask_statistics(p):
    from fastft.kernels.rank_ops import dropout_mask

    M, K = 128, 256
    keep = dropout_mask(1234, M, K, p, "cpu").float()
    n = keep.numel()
    sigma = (p * (1 - p) / n) ** 0.5
    assert abs(keep.mean().item() - (1 - p)) < 5 * sigma
    # no structure along rows or columns: every row and column keeps about 1-p
    assert (keep.mean(1) - (1 - p)).abs().max() < 6 * (p * (1 - p) / K) ** 0.5
    assert (keep.mean(0) - (1 - p)).abs().max() < 6 * (p * (1 - p) / M) ** 0.5
    other = dropout_mask(1235, M, K, p, "cpu").float()
    assert (keep != other).float().mean() > 0.5 * 2 * p * (1 - p)  # a new seed gives a new mask


@interpreter_only
def test_dropout_deterministic_under_torch_seed():
    x, W, b, A, B = _inputs(24, 32, 16, 4, torch.float32)
    outs = []
    for seed in (7, 7, 8):
        torch.manual_seed(seed)
        outs.append(lora_linear(x, W, b, A, B, 2.0, 0.4, backend="triton").detach())
    assert torch.equal(outs[0], outs[1])
    assert not torch.equal(outs[0], outs[2])


def test_cpu_default_is_the_torch_reference():
    x, W, b, A, B = _inputs(9, 16, 8, 2, torch.float32)
    y = lora_linear(x, W, b, A, B, 2.0)
    y_ref = lora_linear_reference(x, W, b, A, B, 2.0)
    assert torch.equal(y, y_ref)


@interpreter_only
def test_empty_batch():
    x, W, b, A, B = _inputs(0, 16, 8, 2, torch.float32)
    y = lora_linear(x, W, b, A, B, 2.0, backend="triton")
    assert y.shape == (0, 8)


@interpreter_only
def test_autocast_computes_in_autocast_dtype():
    x, W, b, A, B = _inputs(16, 32, 24, 4, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = lora_linear(x, W, b, A, B, 2.0, backend="triton")
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32 and A.grad.dtype == torch.float32
    y_ref = lora_linear_reference(x.detach().double(), W.double(), b.detach().double(), A.detach().double(),
                                  B.detach().double(), 2.0)
    assert rel_err(y, y_ref) < TOL[torch.bfloat16]


BAD_INPUTS = [
    (lambda x, W, b, A, B: (x[..., :-1], W, b, A, B), "`x` has 31 features"),
    (lambda x, W, b, A, B: (x, W, b, A[:, :-1], B), "`lora_A` must have shape"),
    (lambda x, W, b, A, B: (x, W, b, A, B[:-1]), "`lora_B` must have shape"),
    (lambda x, W, b, A, B: (x, W, b[:-1], A, B), "`bias` must have shape"),
    (lambda x, W, b, A, B: (x, W.half(), b, A, B), "`x` is torch.float32 but `weight` is torch.float16"),
    (lambda x, W, b, A, B: (x, W[0], b, A, B), "`weight` must be 2-D"),
    (lambda x, W, b, A, B: (x.long(), W, b, A, B), "`x` must be a floating-point tensor"),
    (lambda x, W, b, A, B: (x, W, b, A.to("meta"), B), "one device"),
]


@pytest.mark.parametrize("mutate,message", BAD_INPUTS)
def test_bad_inputs_name_the_argument(mutate, message):
    args = _inputs(8, 32, 24, 4, torch.float32)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("`", "`")):
        lora_linear(*mutate(*args), 2.0)


@pytest.mark.parametrize("kwargs,message", [
    (dict(dropout_p=1.0), "`dropout_p` must be in"),
    (dict(dropout_p=-0.1), "`dropout_p` must be in"),
    (dict(backend="cuda"), "`backend` must be one of"),
])
def test_bad_options(kwargs, message):
    x, W, b, A, B = _inputs(8, 32, 24, 4, torch.float32)
    with pytest.raises(ValueError, match=message):
        lora_linear(x, W, b, A, B, 2.0, **kwargs)


def test_bad_scaling():
    x, W, b, A, B = _inputs(8, 32, 24, 4, torch.float32)
    with pytest.raises(ValueError, match="`scaling` must be a finite number"):
        lora_linear(x, W, b, A, B, float("nan"))


@interpreter_only
def test_split_variants_of_the_rank_kernels(monkeypatch, captured_seeds):
    """The GPU configs split the skinny products over K (fp32 partials) and over M: same results."""
    from fastft.kernels import rank_ops

    monkeypatch.setattr(rank_ops, "project_configs",
                        lambda e, dropout=False: [dict(BLOCK_M=16, BLOCK_K=16, SPLIT_K=3, num_warps=4, num_stages=1)])
    monkeypatch.setattr(rank_ops, "reduce_configs",
                        lambda e, dropout=False, beside_gemm=False: [dict(BLOCK_M=16, BLOCK_N=16, PER_SM=8,
                                                                          num_warps=4, num_stages=1)])
    x, W, b, A, B = _inputs(70, 80, 40, 6, torch.float32)
    _check_against_reference(x, W, b, A, B, s=2.0, p=0.2, seeds=captured_seeds)
