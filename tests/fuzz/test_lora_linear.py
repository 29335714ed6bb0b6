"""Property-based fuzzing of `lora_linear` (both backends) against the fp64 reference in references.py."""
from __future__ import annotations

import contextlib
import math
import os
from unittest import mock

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fastft.ops import shared
from fastft.ops.lora import lora_linear
from tests.fuzz import references as ref
from tests.fuzz.checks import check_example, grads_of, needing_grad
from tests.fuzz.strategies import dim, float_dtypes, fuzz, tensor
from tests.utils import interpreter_only

OP = "lora_linear"
# Roundings to the compute dtype on the longest path of either backend (see references.py): the torch backend
# rounds the A and B casts, x·Aᵀ, (x·Aᵀ)·Bᵀ, x·Wᵀ + b, s·lora, the sum and the dropout-scaled input: 8. The
# Triton path rounds fewer (casts, xs = c·x·Aᵀ, the output). Backward likewise: 8.
N_ROUND = 8
SCALINGS = (0.0, 1.0, 0.5, -2.0, 1 / 33, 16.0)


@contextlib.contextmanager
def captured_seeds():
    """The dropout seeds the fused op draws, so the test can regenerate the kernels' exact keep-mask."""
    seeds = []
    draw = shared.draw_seed
    with mock.patch.object(shared, "draw_seed", lambda: seeds.append(draw()) or seeds[-1]):
        yield seeds


def draw_problem(data, *, device="cpu", max_rows=40, max_features=70, dropout=True):
    """A random lora_linear call: every tensor in a drawn layout, sizes 0/1/odd, r up to 33, mixed dtypes."""
    dtype = data.draw(float_dtypes(), label="dtype")
    adapter_dtype = data.draw(st.sampled_from([dtype, torch.float32]), label="adapter dtype")
    lead = data.draw(st.sampled_from([(), (2,), (1, 3)]), label="leading dims")
    M = dim(data, 0, max_rows, label="rows")
    K = dim(data, 0, max_features, label="in_features")
    N = dim(data, 0, max_features, label="out_features")
    r = dim(data, 1, 33, label="r")
    g = dict(device=device, requires_grad=True)
    x = tensor(data, lead + (M, K), dtype, label="x", **g)
    W = tensor(data, (N, K), dtype, label="weight", device=device,
               requires_grad=data.draw(st.booleans(), label="weight grad"))
    bias = None
    bias_dtype = data.draw(st.sampled_from([None, dtype, torch.float32]), label="bias dtype")
    if bias_dtype is not None:
        bias = tensor(data, (N,), bias_dtype, label="bias", **g)
    A = tensor(data, (r, K), adapter_dtype, label="lora_A", **g)
    B = tensor(data, (N, r), adapter_dtype, label="lora_B", **g)
    s = data.draw(st.sampled_from(SCALINGS), label="scaling")
    p = data.draw(st.sampled_from([0.0, 0.0, 0.25, 0.6]), label="dropout_p") if dropout else 0.0
    dy = tensor(data, lead + (M, N), dtype, label="dy", device=device)
    return dict(x=x, weight=W, bias=bias, lora_A=A, lora_B=B, scaling=s, dropout_p=p), dy


def run_and_check(args, dy, backend):
    """Run the op with autograd, regenerate the dropout mask the kernels used, compare all against fp64."""
    x, W, b, A, B = (args[n] for n in ("x", "weight", "bias", "lora_A", "lora_B"))
    s, p = args["scaling"], args["dropout_p"]
    inputs = needing_grad((("x", x), ("weight", W), ("bias", b), ("lora_A", A), ("lora_B", B)))
    with captured_seeds() as seeds:
        y = lora_linear(x, W, b, A, B, s, p, backend=backend)
    grads = grads_of(y, inputs, dy, allow_unused=True)
    M, K = math.prod(x.shape[:-1]), x.shape[-1]
    N, r = W.shape[0], A.shape[0]
    keep = None
    if p > 0:
        if seeds:  # the fused path: its mask is a function of the seed and the element's (row, column)
            from fastft.kernels.rank_ops import dropout_mask
            keep = dropout_mask(seeds[0], M, K, p, x.device).view(x.shape)
        else:  # the torch path draws its own mask: only empty problems, where no mask matters, may get here
            assert y.numel() == 0 or x.numel() == 0 or backend == "torch"
            if y.numel() and x.numel():
                return
            keep = torch.ones(x.shape, dtype=torch.bool, device=x.device)
    y64, g64, ymag, gmag = ref.linear_with_grads(x, W, b, A, B, s, dy, keep=keep, p=p,
                                                 grad_w=W.requires_grad)
    lengths = {"y": (K, r), "x": (N, r), "weight": (M,), "bias": (M,), "lora_A": (N, M), "lora_B": (K, M)}
    check_example(OP, backend, inputs, grads, y, y64, ymag, g64, gmag, x.dtype, N_ROUND, lengths)


@interpreter_only
@fuzz(40)
@given(data=st.data())
def test_lora_linear_triton(data):
    args, dy = draw_problem(data)
    run_and_check(args, dy, "triton")


@interpreter_only
@fuzz(12)
@given(data=st.data())
def test_lora_linear_triton_fold(data):
    """The folded path (x·Aᵀ and dy·B inside the GEMMs' loops, FASTFT_LORA_PATH=fold) on the same kind of draws."""
    args, dy = draw_problem(data)
    with mock.patch.dict(os.environ, {"FASTFT_LORA_PATH": "fold"}):
        run_and_check(args, dy, "triton")


@fuzz(60)
@given(data=st.data())
def test_lora_linear_torch(data):
    args, dy = draw_problem(data, dropout=False)  # its dropout mask is torch's own: see the statistics test
    run_and_check(args, dy, "torch")


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=interpreter_only)])
def test_lora_dropout_statistics(backend):
    """Dropout without the mask: the LoRA term averaged over fresh masks tends to its no-dropout value
    (inverted dropout is unbiased), and about a fraction p of x's entries is dropped."""
    torch.manual_seed(1234)
    M, K, N, r, p, trials = 8, 24, 12, 4, 0.3, 48
    x, W, A, B = torch.randn(M, K), torch.randn(N, K), torch.randn(r, K), torch.randn(N, r)
    full = lora_linear(x, W, None, A, B, 1.0, 0.0, backend=backend).double()
    samples = torch.stack([lora_linear(x, W, None, A, B, 1.0, p, backend=backend).double() for _ in range(trials)])
    mean, sd = samples.mean(0), samples.std(0)
    z = (mean - full).abs() / (sd / math.sqrt(trials) + 1e-12)
    assert z.max() < 6.0, f"dropout biased: max z-score {z.max():.1f} over {trials} masks"
    # The drop rate, from a LoRA that reads one input column each (A = I): dropped columns give exactly 0.
    I = torch.eye(K)
    lora = lora_linear(x, torch.zeros(K, K), None, I, I, 1.0, p, backend=backend)
    dropped = (lora == 0).double().mean().item()
    sigma = math.sqrt(p * (1 - p) / lora.numel())
    assert abs(dropped - p) < 6 * sigma, f"drop rate {dropped:.3f}, expected {p} ± {6 * sigma:.3f}"


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "torch"])
@fuzz(20)
@given(data=st.data())
def test_lora_linear_gpu(data, backend, exact_cuda_reductions):
    args, dy = draw_problem(data, device="cuda", max_rows=300, max_features=520, dropout=backend == "triton")
    run_and_check(args, dy, backend)


@pytest.mark.gpu
@fuzz(20)
@given(data=st.data())
def test_lora_linear_gpu_fold(data, exact_cuda_reductions):
    """The folded path on the GPU (descriptor and pointer-load variants, dropout in the backward)."""
    args, dy = draw_problem(data, device="cuda", max_rows=300, max_features=520)
    with mock.patch.dict(os.environ, {"FASTFT_LORA_PATH": "fold"}):
        run_and_check(args, dy, "triton")
