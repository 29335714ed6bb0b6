"""The folded LoRA linear (x·Aᵀ and dy·B computed inside the GEMMs' own loops, fastft.ops.lora_path's `fold`
path) against an fp64 reference through the interpreter, the folded GEMM launcher on its own, and the path
selection rule (split unless forced or measured)."""
import random

import pytest
import torch

from fastft.kernels import lora_gemm, rank_ops
from fastft.ops import lora_path
from tests.test_lora_linear_op import DTYPES, _check_against_reference, _inputs
from tests.utils import assert_close, interpreter_only


@pytest.fixture
def launches(monkeypatch):
    """FASTFT_LORA_PATH=fold, and a count of each rank-R launcher's calls (to see which path ran)."""
    monkeypatch.setenv(lora_path.ENV, "fold")
    counts = dict(folded_fwd=0, folded_dx=0, rank_project=0, rank_reduce=0, rank_reduce_pair=0)

    def folded(*args, b_nk, **kw):
        counts["folded_fwd" if b_nk else "folded_dx"] += 1
        return real["lora_gemm_folded"](*args, b_nk=b_nk, **kw)

    def counting(name):
        def call(*args, **kw):
            counts[name] += 1
            return real[name](*args, **kw)
        return call

    rank_launchers = ("rank_project", "rank_reduce", "rank_reduce_pair")
    real = {"lora_gemm_folded": lora_gemm.lora_gemm_folded, **{name: getattr(rank_ops, name) for name in rank_launchers}}
    monkeypatch.setattr(lora_gemm, "lora_gemm_folded", folded)
    for name in rank_launchers:
        monkeypatch.setattr(rank_ops, name, counting(name))
    monkeypatch.setattr(lora_gemm, "_lora_gemm_kernel", _RecordVariant(lora_gemm._lora_gemm_kernel))
    return counts


class _RecordVariant:
    """Wraps the GEMM kernel: records (FOLD, USE_TMA) of every launch in `variants`, then launches."""
    variants: list = []

    def __init__(self, kernel):
        self.kernel = kernel
        _RecordVariant.variants = []

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*args, **kw):
            _RecordVariant.variants.append((kw["FOLD"], kw["USE_TMA"]))
            return launch(*args, **kw)
        return run


FOLDED = dict(folded_fwd=1, folded_dx=1, rank_project=0, rank_reduce=0, rank_reduce_pair=1)  # 3 launches


@interpreter_only
@pytest.mark.parametrize("r", [1, 8, 16, 33])
@pytest.mark.parametrize("dtype", DTYPES)
def test_fold_forward_and_grads_match_fp64(dtype, r, launches):
    rng = random.Random(100 * r + DTYPES.index(dtype))
    M = rng.choice([1, 37, 70])
    # fp32: odd K and N (rows not 16-byte aligned: the pointer-load variant); half: aligned rows (descriptors).
    # Several 32-wide N tiles: only pid_n == 0 writes xs / g.
    K, N = (rng.choice([37, 100]), rng.choice([1, 45, 70])) if dtype == torch.float32 else (
        rng.choice([40, 64, 96]), rng.choice([40, 72]))
    x, W, b, A, B = _inputs(M, K, N, r, dtype, bias=rng.random() < 0.7)
    _check_against_reference(x, W, b, A, B, s=rng.choice([0.5, 2.0]))
    assert launches == FOLDED
    assert _RecordVariant.variants == [(True, dtype != torch.float32)] * 2  # forward and dx, both folded


@interpreter_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fold_non_contiguous_and_batched_inputs(dtype, launches):
    base = torch.randn(2, 35, 2 * 48).to(dtype)
    x = base[..., ::2].requires_grad_()  # strided columns, leading batch dim
    assert not x.is_contiguous()
    W = (torch.randn(48, 40) * 0.2).to(dtype).t()  # a transposed (column-major) weight
    A = (torch.randn(48, 6) * 0.2).to(dtype).t().requires_grad_()
    B = (torch.randn(6, 40) * 0.2).to(dtype).t().requires_grad_()
    b = torch.randn(40).requires_grad_()  # an fp32 bias on a half base
    _check_against_reference(x, W, b, A, B, s=2.0)
    assert launches == FOLDED


@interpreter_only
def test_fold_out_features_zero_and_one(launches):
    x, W, b, A, B = _inputs(21, 32, 1, 3, torch.float32)
    _check_against_reference(x, W, b, A, B, s=1.5)
    x, W, b, A, B = _inputs(21, 32, 0, 3, torch.float32)  # empty y: the reference path, no kernel
    from fastft.ops import lora_linear

    y = lora_linear(x, W, b, A, B, 1.5, backend="triton")
    y.sum().backward()
    assert y.shape == (21, 0) and torch.equal(x.grad, torch.zeros_like(x)) and A.grad.abs().sum() == 0
    assert launches["folded_fwd"] == 1


@interpreter_only
def test_fold_with_dropout_projects_forward_and_folds_backward(launches, captured_seeds):
    # the forward's mask acts on x before A: the forward stays split; the backward's g = c·dy·B has no mask
    x, W, b, A, B = _inputs(45, 64, 50, 6, torch.bfloat16)
    _check_against_reference(x, W, b, A, B, s=2.0, p=0.3, seeds=captured_seeds)
    assert launches == dict(FOLDED, folded_fwd=0, rank_project=1)


@interpreter_only
def test_fold_split_m_reductions_with_dropout(monkeypatch, launches, captured_seeds):
    """The GPU configs split dA/dB over M (fp32 partials summed after): the pair launch with several splits."""
    monkeypatch.setattr(rank_ops, "reduce_configs",
                        lambda e, dropout=False, beside_gemm=False: [dict(BLOCK_M=16, BLOCK_N=16, PER_SM=8,
                                                                          num_warps=4, num_stages=1)])
    x, W, b, A, B = _inputs(70, 40, 24, 6, torch.float32)
    _check_against_reference(x, W, b, A, B, s=2.0, p=0.2, seeds=captured_seeds)
    assert launches["rank_reduce_pair"] == 1


@interpreter_only
def test_fold_frozen_input_still_gets_adapter_grads(launches):
    # no dx to fold into: g comes from the skinny pass
    x, W, b, A, B = _inputs(20, 32, 24, 4, torch.float32, bias=False)
    x.requires_grad_(False)
    _check_against_reference(x, W, b, A, B, s=1.0)
    assert launches == dict(FOLDED, folded_dx=0, rank_project=1)


@interpreter_only
@pytest.mark.parametrize("b_nk", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_folded_gemm_launcher(b_nk, dtype):
    """lora_gemm_folded alone: c = a·bᵀ + (s·a·p)·tᵀ (+ bias) and lo = s·a·p, every row of lo written."""
    M, K, N, R, s = 70, 48, 75, 16, 0.7
    a = torch.randn(M, K).to(dtype)
    w = (torch.randn(N, K) * 0.2).to(dtype)
    p = (torch.randn(K, R) * 0.2).to(dtype)
    t = (torch.randn(N, R) * 0.2).to(dtype)
    bias = torch.randn(N) if b_nk else None
    if b_nk:  # forward: W [N,K], A [R,K], B [N,R]
        c, lo = lora_gemm.lora_gemm_folded(a, w, p.t().contiguous(), t, bias, b_nk=True, scale=s)
    else:  # dx: b is stored [K,N] (the layer's W [out,in] with out = this K), p is B [K,R], t is A [R,N]
        c, lo = lora_gemm.lora_gemm_folded(a, w.t().contiguous(), p, t.t().contiguous(), None, b_nk=False, scale=s)
    lo_ref = s * a.double() @ p.double()
    c_ref = a.double() @ w.double().t() + lo.double() @ t.double().t()  # the tail uses lo as rounded
    if bias is not None:
        c_ref += bias.double()
    assert lo.dtype == dtype and lo.shape == (M, R)
    assert_close(lo, lo_ref, dtype, "lo")
    assert_close(c, c_ref, dtype, "c")


@interpreter_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rank_reduce_pair(dtype):
    """Both reductions of one launch against fp64: dropout on the first pair's y only, ragged column tiles."""
    M, NA, NB, R, p, seed = 45, 70, 33, 16, 0.3, 1234
    la, lb = torch.randn(M, R).to(dtype), torch.randn(M, R).to(dtype)
    ya, yb = torch.randn(M, NA).to(dtype), torch.randn(NB, M).to(dtype).t()  # yb column-major
    da, db = rank_ops.rank_reduce_pair(la, ya, lb, yb, p_drop=p, seed=seed)
    keep = rank_ops.dropout_mask(seed, M, NA, p, "cpu")
    assert da.dtype == db.dtype == torch.float32 and da.shape == (R, NA) and db.shape == (NB, R)
    assert db.is_contiguous()  # B's own layout: autograd accumulates it without a copy
    assert_close(da, la.double().t() @ (ya.double() * keep), dtype, "da")
    assert_close(db, yb.double().t() @ lb.double(), dtype, "db")


def test_path_choice_defaults_to_split(monkeypatch):
    monkeypatch.delenv(lora_path.ENV, raising=False)
    assert lora_path.choose("forward", 8192, 4096, 4096, 16, torch.bfloat16) == "split"
    assert lora_path.choose("backward", 8192, 4096, 4096, 16, torch.bfloat16) == "split"


def test_path_choice_reads_measurements(monkeypatch):
    monkeypatch.delenv(lora_path.ENV, raising=False)
    key = lora_path.path_key("forward", 8192, 4096, 4096, 16, torch.bfloat16)
    monkeypatch.setitem(lora_path.MEASURED, key, "fold")
    assert lora_path.choose("forward", 6000, 4096, 4096, 16, torch.bfloat16) == "fold"  # same M bucket
    assert lora_path.choose("forward", 6000, 4096, 4096, 16, torch.bfloat16, dropout=True) == "split"
    assert lora_path.choose("backward", 6000, 4096, 4096, 16, torch.bfloat16) == "split"  # not measured
    assert lora_path.choose("forward", 6000, 4096, 4096, 16, torch.float16) == "split"
    monkeypatch.setenv(lora_path.ENV, "split")
    assert lora_path.choose("forward", 6000, 4096, 4096, 16, torch.bfloat16) == "split"


def test_path_choice_forced_and_its_limits(monkeypatch):
    monkeypatch.setenv(lora_path.ENV, " Fold ")
    assert lora_path.choose("backward", 5, 64, 64, 64, torch.float32) == "fold"
    assert lora_path.choose("backward", 5, 64, 64, 128, torch.float32) == "split"  # above FOLD_MAX_RANK
    assert lora_path.choose("forward", 5, 64, 64, 16, torch.float32, dropout=True) == "split"
    assert lora_path.FOLD_MAX_RANK == lora_gemm.FOLD_MAX_RANK
    monkeypatch.setenv(lora_path.ENV, "fused")
    with pytest.raises(ValueError, match="FASTFT_LORA_PATH must be one of split, fold or auto"):
        lora_path.choose("forward", 5, 64, 64, 16, torch.float32)


def _fused_adamw_step(A, B):
    opt = torch.optim.AdamW([A, B], lr=0.5, fused=True)
    A.grad, B.grad = torch.randn_like(A), torch.randn_like(B)
    opt.step()


def _data_copy(A, B):
    A.data.copy_(torch.randn_like(A))
    B.data.copy_(torch.randn_like(B))


@interpreter_only
@pytest.mark.parametrize("update", [_fused_adamw_step, _data_copy])
def test_in_place_adapter_updates_are_seen_by_the_next_call(update, monkeypatch):
    """torch's fused AdamW (torch 2.13) and writes through .data change parameters in place without bumping their
    _version: the op must not keep padded/cast adapter copies keyed by version (they would go stale). fp32 adapters
    on a bf16 base with r=5: the case that pads and casts."""
    from fastft.ops import lora_linear, lora_linear_reference

    monkeypatch.setenv(lora_path.ENV, "fold")
    x, W, b, _, _ = _inputs(16, 32, 24, 5, torch.bfloat16, bias=False)
    A = torch.nn.Parameter(torch.randn(5, 32) * 0.2)
    B = torch.nn.Parameter(torch.randn(24, 5) * 0.2)
    lora_linear(x.detach(), W, None, A, B, 2.0, backend="triton")
    before = (A.detach().clone(), B.detach().clone())
    update(A, B)
    assert not torch.equal(A.detach(), before[0]) and not torch.equal(B.detach(), before[1])
    y = lora_linear(x.detach(), W, None, A, B, 2.0, backend="triton")
    ref = lora_linear_reference(x.detach().double(), W.double(), None, A.detach().double(), B.detach().double(), 2.0)
    assert_close(y, ref, torch.bfloat16, f"y after {update.__name__}")
