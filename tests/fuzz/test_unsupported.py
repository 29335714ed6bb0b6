"""Inputs the ops' docstrings call unsupported raise a ValueError naming the argument, on both backends."""
from __future__ import annotations

import pytest
import torch

from fastft.ops.attention import flash_attention
from fastft.ops.lora import lora_linear
from fastft.ops.qlora import nf4_linear, qlora_linear
from fastft.quant.nf4_weight import quantize_nf4
from tests.utils import INTERPRET

BACKENDS = ["torch"] + (["triton"] if INTERPRET else [])


def _lora_args():
    return dict(x=torch.randn(3, 8), weight=torch.randn(6, 8), bias=torch.randn(6), lora_A=torch.randn(2, 8),
                lora_B=torch.randn(6, 2), scaling=1.0, dropout_p=0.0)


LORA_CASES = {  # name: (change to the valid arguments, the argument the message must name)
    "x int": (dict(x=torch.ones(3, 8, dtype=torch.int64)), "`x`"),
    "x 0-d": (dict(x=torch.tensor(1.0)), "`x`"),
    "x features": (dict(x=torch.randn(3, 7)), "`x`"),
    "weight 1-d": (dict(weight=torch.randn(8)), "`weight`"),
    "weight dtype": (dict(weight=torch.randn(6, 8, dtype=torch.float16)), "`weight`"),
    "rank 0": (dict(lora_A=torch.randn(0, 8), lora_B=torch.randn(6, 0)), "`lora_A`"),
    "lora_B shape": (dict(lora_B=torch.randn(6, 3)), "`lora_B`"),
    "bias shape": (dict(bias=torch.randn(5)), "`bias`"),
    "bias int": (dict(bias=torch.ones(6, dtype=torch.int32)), "`bias`"),
    "scaling nan": (dict(scaling=float("nan")), "`scaling`"),
    "scaling tensor": (dict(scaling=torch.tensor(1.0)), "`scaling`"),
    "dropout 1": (dict(dropout_p=1.0), "`dropout_p`"),
    "dropout negative": (dict(dropout_p=-0.1), "`dropout_p`"),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", LORA_CASES)
def test_lora_linear_rejects(case, backend):
    change, name = LORA_CASES[case]
    with pytest.raises(ValueError, match=f"lora_linear: .*{name}"):
        lora_linear(**(_lora_args() | change), backend=backend)


def test_lora_linear_triton_rejects_float64():
    if not INTERPRET:
        pytest.skip("the Triton backend on CPU needs the interpreter")
    args = {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in _lora_args().items()}
    with pytest.raises(ValueError, match="lora_linear: backend='triton' .*`x` is torch.float64"):
        lora_linear(**args, backend="triton")
    assert lora_linear(**args, backend="torch").dtype == torch.float64


QW = None


def _qlora_args():
    global QW
    QW = quantize_nf4(torch.randn(6, 64)) if QW is None else QW
    return dict(x=torch.randn(3, 64), qweight=QW, bias=torch.randn(6), lora_A=torch.randn(2, 64),
                lora_B=torch.randn(6, 2), scaling=1.0, dropout_p=0.0)


QLORA_CASES = {
    "x float64": (dict(x=torch.randn(3, 64, dtype=torch.float64)), "`x`"),
    "x features": (dict(x=torch.randn(3, 63)), "`x`"),
    "dense weight": (dict(qweight=torch.randn(6, 64)), "`qweight`"),
    "lora_A shape": (dict(lora_A=torch.randn(2, 32)), "`lora_A`"),
    "bias shape": (dict(bias=torch.randn(7)), "`bias`"),
    "dropout": (dict(dropout_p=1.5), "`dropout_p`"),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", QLORA_CASES)
def test_qlora_and_nf4_linear_reject(case, backend):
    change, name = QLORA_CASES[case]
    args = _qlora_args() | change
    with pytest.raises(ValueError, match=f"qlora_linear: .*{name}"):
        qlora_linear(**args, backend=backend)
    if name in ("`x`", "`qweight`", "`bias`"):
        with pytest.raises(ValueError, match=f"nf4_linear: .*{name}"):
            nf4_linear(args["x"], args["qweight"], args["bias"], backend=backend)


def _attn(**change):
    q = torch.randn(1, 5, 2, 16)
    return dict(q=q, k=q.clone(), v=q.clone()) | change


def _packed(**change):
    t = torch.randn(9, 2, 16)
    return dict(q=t, k=t.clone(), v=t.clone(), cu_seqlens=torch.tensor([0, 4, 9], dtype=torch.int32)) | change


ATTENTION_CASES = {
    "head_dim 12": (_attn(q=torch.randn(1, 5, 2, 12), k=torch.randn(1, 5, 2, 12), v=torch.randn(1, 5, 2, 12)),
                    "head_dim"),
    "head_dim 264": (_attn(q=torch.randn(1, 2, 1, 264), k=torch.randn(1, 2, 1, 264), v=torch.randn(1, 2, 1, 264)),
                     "head_dim"),
    "float64": (_attn(q=torch.randn(1, 5, 2, 16, dtype=torch.float64)), "`q`"),
    "mixed dtypes": (_attn(v=torch.randn(1, 5, 2, 16, dtype=torch.float16)), "`q`, `k`, `v`"),
    "gqa heads": (_attn(q=torch.randn(1, 5, 3, 16)), "`q` has 3 heads"),
    "k/v shapes": (_attn(v=torch.randn(1, 4, 2, 16)), "`k` and `v`"),
    "empty k": (_attn(k=torch.randn(1, 0, 2, 16), v=torch.randn(1, 0, 2, 16)), "at least one position"),
    "window 0": (_attn(window=0), "`window`"),
    "window bool": (_attn(window=True), "`window`"),
    "window float": (_attn(window=2.0**40), "`window`"),
    "causal int": (_attn(causal=1), "`causal`"),
    "scale negative": (_attn(softmax_scale=-1.0), "`softmax_scale`"),
    "prefix alone": (_attn(prefix_k=torch.randn(1, 3, 2, 16)), "`prefix_k` and `prefix_v`"),
    "prefix heads": (_attn(prefix_k=torch.randn(1, 3, 1, 16), prefix_v=torch.randn(1, 3, 1, 16)), "`prefix_k`"),
    "max_seqlen dense": (_attn(max_seqlen=5), "`max_seqlen`"),
    "cu int64": (_packed(cu_seqlens=torch.tensor([0, 4, 9])), "`cu_seqlens`"),
    "cu decreasing": (_packed(cu_seqlens=torch.tensor([0, 6, 4, 9], dtype=torch.int32)), "`cu_seqlens`"),
    "cu wrong total": (_packed(cu_seqlens=torch.tensor([0, 4, 8], dtype=torch.int32)), "`cu_seqlens`"),
    "max_seqlen float": (_packed(max_seqlen=5.0), "`max_seqlen`"),
    "max_seqlen bool": (_packed(max_seqlen=True), "`max_seqlen`"),
    "max_seqlen too small": (_packed(max_seqlen=4), "`max_seqlen`"),
    "packed 4-d": (_packed(q=torch.randn(1, 9, 2, 16)), "`q`"),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ATTENTION_CASES)
def test_flash_attention_rejects(case, backend):
    args, fragment = ATTENTION_CASES[case]
    with pytest.raises(ValueError, match="flash_attention: .*" + fragment.replace("(", r"\(")):
        flash_attention(**args, backend=backend)
