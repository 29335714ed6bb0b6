"""Regressions from a review of what the fused ops keep for backward (counted with saved_tensors_hooks, one entry per
storage, the call's own inputs left out):
- eager LoRA / QLoRA / DoRA / bottleneck adapter kept rank-padded, dtype-cast or scaled (fp16: B_p = b·B) copies of
  their adapter factors until backward; they keep the factors themselves now (so an in-place change of one before
  backward is refused by autograd's version check) and rebuild the copies in backward;
- under torch.autocast with fp32 weights, LoRA and DoRA kept the bf16 cast of the frozen W even when no input
  gradient (the only reader of W) was needed;
- the relu bottleneck adapter kept both the pre-activation p and z = relu(p); z alone gives relu'(p) (z > 0).
Each test also checks the gradients against fp64. Small sizes: the Triton kernels run through the interpreter."""
from __future__ import annotations

import contextlib

import pytest
import torch

from fastft.kernels.rank_ops import rank_pad
from fastft.ops import dora_linear, dora_linear_reference, lora_linear, lora_linear_reference, qlora_linear
from fastft.ops.bottleneck_adapter import bottleneck_adapter, bottleneck_adapter_reference
from fastft.quant import quantize_nf4
from tests.utils import assert_close, interpreter_only

M, K, N = 24, 64, 48  # tokens (2×12), in/out features; K holds whole NF4 blocks of 32
FP32 = 4  # bytes


@contextlib.contextmanager
def saved_bytes():
    """{storage pointer: bytes} of every tensor saved for backward inside the block."""
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield seen


def bytes_besides(seen: dict, *inputs) -> int:
    """Saved bytes not in the storage of any of `inputs` (the call's own tensors)."""
    own = {t.untyped_storage().data_ptr() for t in inputs if t is not None}
    return sum(nb for ptr, nb in seen.items() if ptr not in own)


def size(rows: int, cols: int, dtype: torch.dtype) -> int:
    return rows * cols * torch.empty((), dtype=dtype).element_size()


# (x dtype, adapter dtype, r, scaling, LoRA path): r=5 in fp32 pads and casts both factors; fp16 with s=32 puts a power
# of two into B (lora.split_scaling), a scaled copy of B; r=16 in x's dtype copies nothing (and nothing is rebuilt)
CASES = [(torch.bfloat16, torch.float32, 5, 2.0, "split"), (torch.bfloat16, torch.float32, 5, 2.0, "fold"),
         (torch.float16, torch.float16, 16, 32.0, "split"), (torch.bfloat16, torch.bfloat16, 16, 2.0, "split")]


def _lora_inputs(dtype, adapter_dtype, r):
    x = torch.randn(2, M // 2, K, dtype=dtype).requires_grad_()
    W = torch.randn(N, K, dtype=dtype) * 0.1
    A = (torch.randn(r, K, dtype=adapter_dtype) * 0.2).requires_grad_()
    B = (torch.randn(N, r, dtype=adapter_dtype) * 0.2).requires_grad_()
    return x, W, A, B


def _fp64(*tensors):
    return [t.detach().double().requires_grad_() for t in tensors]


def _call(op, x, W, A, B, s, m=None, bias=None):
    if op == "lora":
        return lora_linear(x, W, bias, A, B, s, backend="triton")
    if op == "qlora":
        return qlora_linear(x, W, bias, A, B, s, backend="triton")
    return dora_linear(x, W, bias, A, B, m, s, backend="triton")


def _reference(op, x, W, A, B, s, m=None):
    if op == "dora":
        return dora_linear_reference(x, W, None, A, B, m, s)
    return lora_linear_reference(x, W, None, A, B, s)


@interpreter_only
@pytest.mark.parametrize("op,dtype,adapter_dtype,r,s,path",
                         [(op, *case) for op in ("lora", "qlora", "dora") for case in CASES
                          if case[-1] == "split" or op == "lora"])  # the fold path is lora_linear's
def test_eager_lora_ops_keep_the_factors_not_copies(monkeypatch, op, dtype, adapter_dtype, r, s, path):
    """Saved: the factors themselves and, of their own, only xs (M×R); DoRA also σ and ‖W'‖ (N fp32 each) and its
    pre-bias output (y itself without a bias). The old code kept A_p (R×K) and B_p (N×R) copies on top."""
    monkeypatch.setenv("FASTFT_LORA_PATH", path)
    x, W, A, B = _lora_inputs(dtype, adapter_dtype, r)
    m = (torch.rand(N) + 0.5).to(dtype).requires_grad_() if op == "dora" else None
    weight = quantize_nf4(W, blocksize=32) if op == "qlora" else W
    with saved_bytes() as seen:
        y = _call(op, x, weight, A, B, s, m)
    R = rank_pad(r)
    expected = size(M, R, dtype)  # xs
    if op == "dora":
        expected += 2 * N * FP32 + size(M, N, dtype)  # σ, ‖W'‖, y
    assert bytes_besides(seen, x, W, A, B, m) == expected
    assert A.untyped_storage().data_ptr() in seen and B.untyped_storage().data_ptr() in seen, "factors not saved"
    dy = torch.randn_like(y)
    y.backward(dy)
    W64 = (weight.dequantize(torch.float32) if op == "qlora" else W).double()
    x64, A64, B64 = _fp64(x, A, B)
    m64 = _fp64(m)[0] if op == "dora" else None
    _reference(op, x64, W64, A64, B64, s, m64).backward(dy.double())
    for name, t, ref in (("dx", x, x64), ("dA", A, A64), ("dB", B, B64)) + ((("dm", m, m64),) if op == "dora" else ()):
        assert t.grad.dtype == t.dtype, name
        assert_close(t.grad, ref.grad, dtype, f"{op} {name}")


@interpreter_only
@pytest.mark.parametrize("op", ["lora", "qlora", "dora"])
def test_factor_changed_in_place_before_backward_is_refused(op):
    """The factors are saved through ctx.save_for_backward: an in-place update between forward and backward is
    autograd's version error, not a silent gradient from the old values (the padded copies hid it)."""
    x, W, A, B = _lora_inputs(torch.bfloat16, torch.float32, 5)
    m = (torch.rand(N) + 0.5).to(torch.bfloat16).requires_grad_() if op == "dora" else None
    y = _call(op, x, quantize_nf4(W, blocksize=32) if op == "qlora" else W, A, B, 2.0, m)
    with torch.no_grad():
        B.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


@interpreter_only
@pytest.mark.parametrize("op", ["lora", "dora"])
@pytest.mark.parametrize("x_grad", [False, True])
def test_autocast_keeps_the_cast_weight_only_for_dx(op, x_grad):
    """fp32 x and W under bf16 autocast: the bf16 casts of x (read by dA) and of W (read by dx only) are the op's own
    tensors; W's is kept only when x needs a gradient, as torch's F.linear does."""
    r = 8
    x, W, A, B = _lora_inputs(torch.float32, torch.float32, r)
    x = x.detach().requires_grad_(x_grad)
    m = (torch.rand(N) + 0.5).requires_grad_() if op == "dora" else None
    with torch.autocast("cpu", dtype=torch.bfloat16), saved_bytes() as seen:
        y = _call(op, x, W, A, B, 2.0, m)
    bf16 = torch.bfloat16
    expected = size(M, K, bf16) + size(M, rank_pad(r), bf16)  # x's cast, xs
    if op == "dora":
        expected += 2 * N * FP32 + size(M, N, bf16)  # σ, ‖W'‖, y
    if x_grad:
        expected += size(N, K, bf16)  # W's cast
    assert bytes_besides(seen, x, W, A, B, m) == expected
    dy = torch.randn_like(y)
    y.backward(dy)
    # fp64 reference on the operands the kernels see (rounded to bf16)
    x64, A64, B64 = _fp64(x.to(bf16), A.to(bf16), B.to(bf16))
    m64 = _fp64(m)[0] if op == "dora" else None
    _reference(op, x64, W.to(bf16).double(), A64, B64, 2.0, m64).backward(dy.double())
    grads = (("dA", A, A64), ("dB", B, B64)) + ((("dx", x, x64),) if x_grad else ())
    for name, t, ref in grads + ((("dm", m, m64),) if op == "dora" else ()):
        assert_close(t.grad, ref.grad, bf16, f"{op} {name}")


@interpreter_only
@pytest.mark.parametrize("activation", ["relu", "silu", "gelu_tanh"])
@pytest.mark.parametrize("weight_dtype", [torch.bfloat16, torch.float32])
def test_bottleneck_adapter_keeps_one_rank_tensor_for_relu_and_no_weight_copies(activation, weight_dtype):
    """Saved besides h and the weights themselves: z (M×R) and, except for relu (relu'(p) is z > 0), p (M×R); no
    padded/cast copies of D and U (r=12 pads to 16, fp32 weights are cast to h's bf16)."""
    dtype, r = torch.bfloat16, 12
    h = torch.randn(2, M // 2, N, dtype=dtype).requires_grad_()
    D, U = (torch.randn(r, N, dtype=weight_dtype) * 0.3).requires_grad_(), \
        (torch.randn(N, r, dtype=weight_dtype) * 0.3).requires_grad_()
    bd, bu = (torch.randn(r, dtype=weight_dtype) * 0.1).requires_grad_(), \
        (torch.randn(N, dtype=weight_dtype) * 0.1).requires_grad_()
    with saved_bytes() as seen:
        y = bottleneck_adapter(h, D, bd, U, bu, activation, backend="triton")
    rank_tensors = 1 if activation == "relu" else 2
    assert bytes_besides(seen, h, D, U, bd, bu) == rank_tensors * size(M, rank_pad(r), dtype)
    dy = torch.randn_like(y)
    y.backward(dy)
    # fp64 reference on the operands the kernels see (weights rounded to h's dtype: relu' is a step)
    leaves = _fp64(h, D.to(dtype), bd.to(dtype), U.to(dtype), bu.to(dtype))
    bottleneck_adapter_reference(*leaves, activation).backward(dy.double())
    for name, t, ref in zip(("dh", "dD", "dbd", "dU", "dbu"), (h, D, bd, U, bu), leaves):
        assert t.grad.dtype == t.dtype, name
        assert_close(t.grad, ref.grad, dtype, f"{activation} {name}")
