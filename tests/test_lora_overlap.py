"""FASTFT_LORA_OVERLAP (fastft.ops.overlap): the LoRA / QLoRA backward's dA and dB on a side stream while the dx GEMM
runs. On the CPU the streams are stand-ins that log what the backward does with them, in order: the side stream waits
for the current one (g is ready), the dx GEMM goes to the current stream first, with the configs that leave room
beside it, then the reductions to the side stream with their small config, and the current stream waits for the side
one last, with the tensors each stream shares recorded on the other (the interpreter has one config a kernel, so the
gradients there are the default path's bit for bit). On the GPU the overlapped backward takes other configs (the dx
GEMM's that leave room, the reductions' 32×64 tile, whose M-splits group the fp32 sums otherwise): the gradients
agree with the default path's to fp32 summation order (bf16 outputs to a rounding), and repeat bit for bit."""
import contextlib

import pytest
import torch

from fastft.kernels import column_dot as column_dot_kernels
from fastft.kernels import lora_gemm as lora_gemm_kernels
from fastft.kernels import nf4_gemm as nf4_gemm_kernels
from fastft.kernels import rank_ops
from fastft.ops import dora_linear, lora_linear, overlap, qlora_linear
from fastft.quant import quantize_nf4
from tests.utils import assert_repeats_bit_identical, interpreter_only, rel_err


class FakeStream:
    def __init__(self, name, log):
        self.name, self.log, self.device = name, log, torch.device("cpu")

    def wait_stream(self, other):
        self.log.append(f"{self.name} waits for {other.name}")


@pytest.fixture
def streams(monkeypatch):
    """The overlap on, with logged stand-in streams; `log` lists what happened, `where` which stream launches go to."""
    log, where = [], ["current"]
    current, side = FakeStream("current", log), FakeStream("side", log)

    @contextlib.contextmanager
    def use(stream):
        where.append(stream.name)
        log.append(f"enter {stream.name}")
        yield
        where.pop()
        log.append(f"leave {stream.name}")

    monkeypatch.setattr(overlap, "_usable", lambda device: True)
    monkeypatch.setattr(overlap, "_current", lambda device: current)
    monkeypatch.setattr(overlap, "_side", lambda device: side)
    monkeypatch.setattr(overlap, "_use", use)
    monkeypatch.setattr(overlap, "_record", lambda t, stream: log.append(f"record {tuple(t.shape)} on {stream.name}"))
    monkeypatch.setattr(overlap, "_enabled", True)
    for module, name in ((rank_ops, "rank_reduce_pair"), (rank_ops, "rank_reduce"), (rank_ops, "rank_project"),
                         (lora_gemm_kernels, "lora_gemm"), (column_dot_kernels, "column_dot"),
                         (nf4_gemm_kernels, "nf4_lora_gemm")):
        real = getattr(module, name)

        def logged(*args, real=real, name=name, **kwargs):
            flags = "".join(f" {flag}" for flag in ("leave_room", "beside_gemm") if kwargs.get(flag))
            log.append(f"{name} on {where[-1]}{flags}")
            return real(*args, **kwargs)
        monkeypatch.setattr(module, name, logged)
    return log


def _leaves(M=5, K=32, N=24, r=4):
    torch.manual_seed(0)
    x = torch.randn(M, K, requires_grad=True)
    W = torch.randn(N, K) * 0.1
    A = (torch.randn(r, K) * 0.1).requires_grad_()
    B = (torch.randn(N, r) * 0.1).requires_grad_()
    return x, W, A, B


def _grads(op, x, W, A, B, dropout_p):
    torch.manual_seed(1)
    y = op(x, W, None, A, B, 2.0, dropout_p, backend="triton")
    return (y, *torch.autograd.grad(y, (x, A, B), torch.ones_like(y)))


@interpreter_only
@pytest.mark.parametrize("dropout_p", [0.0, 0.1])
@pytest.mark.parametrize("op", ["lora", "qlora"])
def test_the_reductions_run_on_the_side_stream_between_fork_and_join(streams, op, dropout_p):
    x, W, A, B = _leaves()
    weight = quantize_nf4(W) if op == "qlora" else W
    fn = qlora_linear if op == "qlora" else lora_linear
    got = _grads(fn, x, weight, A, B, dropout_p)
    log = [e for e in streams if "rank_project" not in e]
    backward = log[log.index("side waits for current"):]
    assert backward[:4] == ["side waits for current", "lora_gemm on current leave_room", "enter side",
                            "rank_reduce_pair on side beside_gemm"], backward
    assert backward.index("leave side") < backward.index("current waits for side") == len(backward) - 1, backward
    # g, x, xs and dy read by the side stream; dA (r, K) and dB (N, r) made there, used on the current stream
    records = [e for e in backward if e.startswith("record")]
    assert records[-2:] == ["record (4, 32) on current", "record (24, 4) on current"], records
    assert len(records) == 6 and all(e.endswith("on side") for e in records[:4]), records
    overlap.set_enabled(False)  # the same gradients without the overlap
    want = _grads(fn, x, weight, A, B, dropout_p)
    for g, w in zip(got, want):
        assert torch.equal(g, w)


@interpreter_only
@pytest.mark.parametrize("nf4", [False, True])
def test_dora_runs_its_reductions_and_magnitude_gradient_on_the_side_stream(streams, nf4):
    """DoRA's backward as LoRA's: the dx GEMM (the dense one; the NF4 path's dequantize + GEMM) on the current stream
    first, leaving room, then dA, dB and the magnitude's column dot on the side stream, the join last."""
    x, W, A, B = _leaves(K=64)  # whole NF4 blocks a row: the fused QDoRA path, not the reference
    weight = quantize_nf4(W) if nf4 else W
    m = (W.norm(dim=1) * 1.1).requires_grad_()

    def grads():
        y = dora_linear(x, weight, None, A, B, m, 2.0, backend="triton")
        return (y, *torch.autograd.grad(y, (x, A, B, m), torch.ones_like(y)))
    got = grads()
    log = [e for e in streams if "rank_project" not in e]
    backward = log[log.index("side waits for current"):]
    side = backward[backward.index("enter side"):backward.index("leave side")]
    assert "rank_reduce_pair on side beside_gemm" in side and "column_dot on side" in side, backward
    dx_gemm = "nf4_lora_gemm on current" if nf4 else "lora_gemm on current leave_room"  # (the fused NF4 GEMM: no room)
    assert backward[1] == dx_gemm and backward[2] == "enter side", backward
    assert backward.index("current waits for side") == len(backward) - 1, backward
    overlap.set_enabled(False)
    for g, w in zip(got, grads()):
        assert torch.equal(g, w)


@interpreter_only
def test_off_by_default_and_where_only_one_gradient_is_wanted(streams, monkeypatch):
    x, W, A, B = _leaves()
    monkeypatch.setattr(overlap, "_enabled", False)
    y = lora_linear(x, W, None, A, B, 2.0, backend="triton")
    y.sum().backward()
    assert not any("side" in e for e in streams)
    monkeypatch.setattr(overlap, "_enabled", True)
    streams.clear()
    x.requires_grad_(False)  # no dx GEMM to overlap with: nothing forks
    y = lora_linear(x, W, None, A, B, 2.0, backend="triton")
    torch.autograd.grad(y.sum(), (A, B))
    assert not any("side" in e for e in streams), streams
    x.requires_grad_(True)  # a padded rank above MAX_RANK: the small reduction config is not checked there
    _, _, A, B = _leaves(r=overlap.MAX_RANK + 1)
    y = lora_linear(x, W, None, A, B, 2.0, backend="triton")
    y.sum().backward()
    assert not any("side" in e or "leave_room" in e for e in streams), streams


def test_the_env_switch_is_read_at_import(monkeypatch):
    """FASTFT_LORA_OVERLAP=1 turns it on at import, anything else leaves it off (one fresh interpreter for "1": an
    import costs seconds; the others re-run the module's code in this one)."""
    import importlib
    import os
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-c", "from fastft.ops import overlap; print(overlap.enabled())"],
                         capture_output=True, text=True, timeout=120, env={**os.environ, overlap.ENV: "1"})
    assert run.stdout.strip() == "True", run.stderr[-2000:]
    for value in ("0", "", "true"):
        monkeypatch.setenv(overlap.ENV, value)
        assert not importlib.reload(overlap).enabled()
    monkeypatch.delenv(overlap.ENV)
    importlib.reload(overlap)


@pytest.mark.gpu
@pytest.mark.parametrize("op", ["lora", "qlora", "dora", "qdora"])
@pytest.mark.parametrize("dropout_p", [0.0, 0.1])
def test_overlapped_gradients_match_the_default_path_on_the_gpu(op, dropout_p):
    """The same math on two streams, at a size where the reductions and the dx GEMM both take many blocks: the
    output bit for bit (the forward does not change), the gradients within summation-order rounding of the default
    path's (other configs: the dx GEMM's that leave room, the reductions' small tile and M-splits), and the
    overlapped gradients the same bits on every repeat (no stream race)."""
    torch.manual_seed(0)
    M, K, N, r = 2048, 1024, 3072, 16
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    W = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * K**-0.5
    A = (torch.randn(r, K, device="cuda") * K**-0.5).requires_grad_()
    B = (torch.randn(N, r, device="cuda") * 0.1).requires_grad_()
    weight = quantize_nf4(W) if op in ("qlora", "qdora") else W
    m = (W.float().norm(dim=1) * 1.1).requires_grad_()
    dy = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
    if op in ("dora", "qdora") and dropout_p > 0:
        pytest.skip("the fused DoRA path is dropout-free")

    def grads():
        torch.manual_seed(1)
        if op in ("dora", "qdora"):
            y = dora_linear(x, weight, None, A, B, m, 2.0)
            return (y, *torch.autograd.grad(y, (x, A, B, m), dy))
        y = (qlora_linear if op == "qlora" else lora_linear)(x, weight, None, A, B, 2.0, dropout_p)
        return (y, *torch.autograd.grad(y, (x, A, B), dy))
    before = overlap.enabled()
    try:
        overlap.set_enabled(False)
        want = grads()
        overlap.set_enabled(True)
        got = grads()
        torch.cuda.synchronize()
        assert torch.equal(got[0], want[0])
        for name, g, w in zip(("dx", "dA", "dB", "dm"), got[1:], want[1:]):
            # bf16 dx: a few elements one rounding apart; fp32 adapter gradients: the sums' order only
            assert rel_err(g, w) <= (1e-3 if g.dtype == torch.bfloat16 else 1e-5), (name, rel_err(g, w))
        assert_repeats_bit_identical(grads, got, 3)
    finally:
        overlap.set_enabled(before)
