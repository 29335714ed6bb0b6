"""fastft/ops/shared.py, the helpers every op dispatches through: backend choice and its refusals, autocast casting
(an NF4 weight passes unchanged), rank padding and row views."""
import pytest
import torch

from fastft.ops import shared
from fastft.quant import quantize_nf4


def test_backend_choice_and_refusals_name_the_op_and_argument(monkeypatch):
    with pytest.raises(ValueError, match=r"my_op: `backend` must be one of \('auto', 'triton', 'torch'\), got 'cuda'"):
        shared.check_backend("my_op", "cuda")
    cpu = torch.device("cpu")
    assert shared.resolve_backend("my_op", "auto", cpu) == "torch"  # auto never picks the interpreter
    assert shared.resolve_backend("my_op", "torch", cpu) == "torch"
    monkeypatch.setattr(shared, "triton_runs_on", lambda device: False)
    with pytest.raises(ValueError, match=r"my_op: backend='triton' needs a CUDA tensor \(or TRITON_INTERPRET=1 on "
                                         r"CPU\); `x` is on cpu"):
        shared.resolve_backend("my_op", "triton", cpu, arg="x")
    with pytest.raises(ValueError, match=r"needs CUDA tensors .*; the inputs are on cpu"):
        shared.resolve_backend("my_op", "triton", cpu)
    monkeypatch.setattr(shared, "triton_runs_on", lambda device: True)
    assert shared.resolve_backend("my_op", "triton", cpu) == "triton"
    fake_cuda = torch.device("cuda", 0)  # only its .type is read
    assert shared.resolve_backend("my_op", "auto", fake_cuda) == "triton"
    assert shared.resolve_backend("my_op", "auto", fake_cuda, dtype=torch.bfloat16) == "triton"
    assert shared.resolve_backend("my_op", "auto", fake_cuda, dtype=torch.float64) == "torch"
    with pytest.raises(ValueError, match=r"my_op: backend='triton' computes in float16, bfloat16 or float32; `x` is "
                                         r"torch.float64"):
        shared.resolve_backend("my_op", "triton", cpu, arg="x", dtype=torch.float64)


def test_autocast_inputs_casts_tensors_and_passes_the_rest():
    x, w = torch.randn(3, 64), torch.randn(8, 64)
    q = quantize_nf4(torch.randn(8, 64), blocksize=32)
    assert shared.autocast_inputs(x, w, None) == (x, w, None)  # outside autocast: the same objects
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cx, cw, cq, none, other = shared.autocast_inputs(x, w, q, None, "not a tensor")
    assert cx.dtype == cw.dtype == torch.bfloat16 and torch.equal(cx, x.to(torch.bfloat16))
    assert cq is q and none is None and other == "not a tensor"
    assert shared.autocast_inputs("x", w) == ("x", w)  # a non-tensor first input: left for validation


def test_padded_and_as_rows():
    t = torch.randn(3, 5)
    assert shared.padded(t, 3, 5, torch.float32) is t
    p = shared.padded(t, 4, 8, torch.float64)
    assert p.shape == (4, 8) and p.dtype == torch.float64 and p.is_contiguous()
    assert torch.equal(p[:3, :5], t.double()) and not p[3:].any() and not p[:, 5:].any()
    # no padding needed but a strided or transposed view: a contiguous copy, same dtype or not (kernels such as DoRA's
    # row norm read the result with unit strides; a strided lora_B once came back as itself)
    for view in (torch.randn(3, 10)[:, ::2], torch.randn(5, 3).t()):
        for dtype in (torch.float32, torch.float16):
            q = shared.padded(view, 3, 5, dtype)
            assert q.is_contiguous() and q.dtype == dtype and torch.equal(q, view.to(dtype))
    x = torch.randn(2, 7, 6)
    rows = shared.as_rows(x)
    assert rows.shape == (14, 6) and rows.data_ptr() == x.data_ptr()  # a view
    strided = torch.randn(2, 6, 7).transpose(1, 2)  # last stride 7
    rows = shared.as_rows(strided)
    assert rows.stride(-1) == 1 and torch.equal(rows, strided.reshape(14, 6))
    rows2 = torch.randn(4, 6)
    assert shared.as_rows(rows2) is rows2  # rows already: no reshape (host time)
    assert shared.as_rows(torch.randn(6, 4).t()).is_contiguous()  # 2-D with last stride 4: a copy


def test_autocast_off_and_to_dtype():
    x = torch.randn(4, 4)
    with shared.autocast_off("cpu"):  # autocast off: a no-op context
        assert not torch.is_autocast_enabled("cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with shared.autocast_off("cpu"):  # on: turned off inside, back on after
            assert not torch.is_autocast_enabled("cpu") and (x @ x).dtype == torch.float32
        assert torch.is_autocast_enabled("cpu") and (x @ x).dtype == torch.bfloat16
    assert shared.to_dtype(x, torch.float32) is x
    h = shared.to_dtype(x, torch.float16)
    assert h.dtype == torch.float16 and torch.equal(h, x.half())
