"""Property-based fuzzing of `qlora_linear` and `nf4_linear` (both backends) against fp64 references.

W is an NF4Weight: the reference dequantizes its stored fields in fp64 (references.nf4_dequantize_f64), so the
comparison measures the kernels' arithmetic, not the quantization error.
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fastft.ops.qlora import nf4_linear, qlora_linear
from fastft.quant.nf4_weight import quantize_nf4
from tests.fuzz import references as ref
from tests.fuzz.checks import check_example, grads_of, needing_grad
from tests.fuzz.strategies import dim, float_dtypes, fuzz, tensor
from tests.fuzz.test_lora_linear import SCALINGS, captured_seeds
from tests.utils import interpreter_only

# Roundings to the compute dtype: lora_linear's 8 plus W dequantized to it (1). The dequantization's own fp32
# arithmetic (code·absmax, nested code2·absmax2 + offset) adds 3·u(fp32) relative to W_mag.
QLORA_ROUND = 9
# nf4_linear: W to the dtype, the bias cast, the output (torch: F.linear; CUDA GEMV: its bias cast, the output).
NF4_ROUND = 3
DEQUANT_REL = 3 * ref.UNIT_ROUNDOFF[torch.float32]


def draw_weight(data, N, *, device="cpu", max_k=128):
    """An NF4Weight of a random N×K matrix: K whole blocks (the fused kernel) or any even/odd K (the fallback)."""
    blocksize = data.draw(st.sampled_from([32, 64, 128]), label="blocksize")
    fused = data.draw(st.booleans(), label="whole blocks")
    if fused:
        K = blocksize * data.draw(st.integers(1, max(1, max_k // blocksize)), label="blocks")
    else:
        K = dim(data, 1, 70, label="K")
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**32 - 1), label="weight seed"))
    scale = data.draw(st.sampled_from([1.0, 2.0**-6, 2.0**5]), label="weight scale")
    dense = torch.randn(N, K, generator=gen) * scale
    qweight = quantize_nf4(dense, blocksize=blocksize, double_quant=data.draw(st.booleans(), label="double quant"))
    return qweight.to(device), K


def draw_problem(data, *, device="cpu", max_rows=33, max_n=70, max_k=128, lora=True, dropout=True):
    dtype = data.draw(float_dtypes(), label="dtype")
    N = dim(data, 1, max_n, label="out_features")
    qweight, K = draw_weight(data, N, device=device, max_k=max_k)
    lead = data.draw(st.sampled_from([(), (2,)]), label="leading dims")
    M = dim(data, 0, max_rows, label="rows")
    g = dict(device=device, requires_grad=True)
    args = dict(x=tensor(data, lead + (M, K), dtype, label="x", **g), qweight=qweight, bias=None)
    bias_dtype = data.draw(st.sampled_from([None, dtype, torch.float32]), label="bias dtype")
    if bias_dtype is not None:
        args["bias"] = tensor(data, (N,), bias_dtype, label="bias", **g)
    if lora:
        adapter_dtype = data.draw(st.sampled_from([dtype, torch.float32]), label="adapter dtype")
        r = dim(data, 1, 33, label="r")
        args.update(lora_A=tensor(data, (r, K), adapter_dtype, label="lora_A", **g),
                    lora_B=tensor(data, (N, r), adapter_dtype, label="lora_B", **g),
                    scaling=data.draw(st.sampled_from(SCALINGS), label="scaling"),
                    dropout_p=data.draw(st.sampled_from([0.0, 0.0, 0.3]), label="dropout_p") if dropout else 0.0)
    dy = tensor(data, lead + (M, N), dtype, label="dy", device=device)
    return args, dy


def run_and_check(op, args, dy, backend):
    x, qweight, b = args["x"], args["qweight"], args["bias"]
    A, B = args.get("lora_A"), args.get("lora_B")
    s, p = args.get("scaling", 0.0), args.get("dropout_p", 0.0)
    inputs = needing_grad((n, args.get(n)) for n in ("x", "bias", "lora_A", "lora_B"))
    with captured_seeds() as seeds:
        if op == "qlora_linear":
            y = qlora_linear(x, qweight, b, A, B, s, p, backend=backend)
        else:
            y = nf4_linear(x, qweight, b, backend=backend)
    grads = grads_of(y, inputs, dy, allow_unused=True)
    M, K, N = math.prod(x.shape[:-1]), x.shape[-1], qweight.shape[0]
    keep = None
    if p > 0:
        if not seeds:  # the torch path's own mask: only an empty problem may get here
            assert x.numel() == 0 or backend == "torch"
            if x.numel():
                return
        from fastft.kernels.rank_ops import dropout_mask
        keep = dropout_mask(seeds[0], M, K, p, x.device).view(x.shape) if seeds else None
    W, W_mag = ref.nf4_dequantize_f64(qweight)
    y64, g64, ymag, gmag = ref.linear_with_grads(x, W, b, A, B, s, dy, keep=keep, p=p, grad_w=False,
                                                 weight_mag=W_mag)
    n_round = QLORA_ROUND if op == "qlora_linear" else NF4_ROUND
    r = A.shape[0] if A is not None else 1
    lengths = {"y": (K, r), "x": (N, r), "bias": (M,), "lora_A": (N, M), "lora_B": (K, M)}
    check_example(op, backend, inputs, grads, y, y64, ymag, g64, gmag, x.dtype, n_round, lengths, DEQUANT_REL)


@interpreter_only
@fuzz(15)
@given(data=st.data())
def test_qlora_linear_triton(data):
    args, dy = draw_problem(data)
    run_and_check("qlora_linear", args, dy, "triton")


@fuzz(30)
@given(data=st.data())
def test_qlora_linear_torch(data):
    args, dy = draw_problem(data, dropout=False)  # torch's own dropout mask: tests/fuzz/test_lora_linear.py
    run_and_check("qlora_linear", args, dy, "torch")


@interpreter_only
@fuzz(15)
@given(data=st.data())
def test_nf4_linear_triton(data):
    args, dy = draw_problem(data, lora=False)
    run_and_check("nf4_linear", args, dy, "triton")


@fuzz(30)
@given(data=st.data())
def test_nf4_linear_torch(data):
    args, dy = draw_problem(data, lora=False)
    run_and_check("nf4_linear", args, dy, "torch")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("op", ["qlora_linear", "nf4_linear"])
@fuzz(12)
@given(data=st.data())
def test_qlora_family_gpu(data, op, backend, exact_cuda_reductions):
    # rows 1–16 reach nf4_linear's CUDA decode GEMV when the extension is built
    args, dy = draw_problem(data, device="cuda", max_rows=300, max_n=520, max_k=1024, lora=op == "qlora_linear",
                            dropout=backend == "triton")
    run_and_check(op, args, dy, backend)
