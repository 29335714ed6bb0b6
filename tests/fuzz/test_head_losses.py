"""Property-based fuzzing of the fused losses that read a head module or a pair of batches — lm_head_cross_entropy
(nn.Linear, NF4Linear, peft LoRA, fastft LoRA and QLoRA heads) and linear_dpo_loss — against fp64 references
written from the math (references.head_logits, head_grads_lora, ce_rows, dpo_terms).

Both ops choose their backend ("auto": the Triton row kernel on CUDA, torch elsewhere) and their chunking
(FASTFT_LOSS_CHUNK_MIB) themselves. The tests steer both: under the interpreter "auto" is mapped to "triton" so
the CPU run takes the path a GPU takes, and the chunk budget is set to a drawn number of token rows per chunk
(which also cuts an NF4 head into vocab blocks). LoRA dropout is drawn too: the mask the op draws per chunk is
captured and the reference applies it.
"""
from __future__ import annotations

import contextlib
import math
import os
from unittest import mock

import peft
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import fastft
import fastft.ops.linear_losses as linear_losses
from fastft.modules.nf4_linear import NF4Linear
from fastft.ops import chunked_logits
from fastft.ops.linear_losses import linear_dpo_loss, lm_head_cross_entropy
from fastft.quant.nf4_weight import quantize_nf4
from tests.fuzz import references as ref
from tests.fuzz.checks import check_grads, draw_ce_options, grads_of, needing_grad
from tests.fuzz.strategies import dim, float_dtypes, fuzz, tensor
from tests.fuzz.test_linear_losses import (FP32_TINY, GRAD_N_ROUND, LOGIT_N_ROUND, SCALAR_GRADS, _check_reduced,
                                           _labels, _row_weights)
from tests.utils import interpreter_only

BACKENDS = ["torch", pytest.param("triton", marks=interpreter_only)]
HEADS = ("linear", "modules_to_save", "nf4", "peft_lora", "fastft_lora", "qlora")
ROWS_PER_CHUNK = (None, 1, 2, 3, 5)  # None: the default budget (one chunk here)
MAX_NF4_BLOCK_CALLS = 64  # chunks × vocab blocks of an NF4 head per pass (~1–7 ms each on the CPU)
DEQUANT_REL = 3 * ref.UNIT_ROUNDOFF[torch.float32]  # NF4 code·absmax (nested: code2·absmax2 + offset) in fp32

# Roundings to the compute dtype on the longest path (references.py's rule). Dense head: linear_cross_entropy's
# LOGIT_N_ROUND / GRAD_N_ROUND. NF4 head: W dequantized to the dtype (+1 on each path through W), and dh sums the
# vocab blocks into one dtype buffer: one rounding per block.
NF4_LOGIT_ROUND = 3  # W to the dtype, the GEMM's output, the bias add
# LoRA logits: h/(1−p), A to the dtype, h·Aᵀ, B (to the adapter dtype, ·s per adapter when several are active, to
# the dtype), the addmm's product, ·s and sum: 10.
LORA_LOGIT_ROUND = 10
# LoRA dh: dlogits, B (3 as above), dl·B, A's cast, (dl·B)·A, ·s, the dropout factor and product, the sum into dh,
# grad_output's cast and product: 13. dA / dB: fewer (their factors' roundings, the product, the final casts).
LORA_GRAD_ROUND = 13


def nf4_vocab_blocks(rows, V, H, dtype, backend) -> int:
    """How many vocab blocks an NF4 head is dequantized in: blocks of at most half the chunk budget
    (fastft.ops.lm_head_cross_entropy's docstring), the budget being the one `steered` sets."""
    if rows is None:
        return 1
    nf4_rows = max(1, chunk_budget(rows, V, dtype, backend) // (2 * H * dtype.itemsize))
    return -(-V // nf4_rows)


def chunk_budget(rows, V, dtype, backend) -> int:
    # a chunk row costs V logits in the dtype, plus the torch row functions' fp32 temporaries (12 B a logit)
    return rows * V * (dtype.itemsize + (12 if backend == "torch" else 0))


@contextlib.contextmanager
def steered(backend, rows, V, dtype):
    """The op's "auto" backend replaced by `backend`, `rows` token rows per chunk (None: the default budget)."""
    env = {k: v for k, v in os.environ.items() if k != "FASTFT_LOSS_CHUNK_MIB"}
    if rows is not None:
        env["FASTFT_LOSS_CHUNK_MIB"] = repr(chunk_budget(rows, V, dtype, backend) / 2**20)  # exact: a power of 2
    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.dict(os.environ, env, clear=True))
        stack.enter_context(mock.patch.object(linear_losses, "resolve_backend", lambda op, b, device, **kw: backend))
        yield


@contextlib.contextmanager
def captured_masks():
    """{t0: keep mask} of the LoRA dropout the op draws per chunk (the first draw per chunk: the forward's)."""
    masks = {}
    keep = chunked_logits.Head._keep

    def record(self, h, t0):
        m = keep(self, h, t0)
        masks.setdefault(t0, m)
        return m

    with mock.patch.object(chunked_logits.Head, "_keep", record):
        yield masks


class _Holder(nn.Module):
    def __init__(self, lm_head, **others):
        super().__init__()
        self.lm_head = lm_head
        for name, module in others.items():
            self.add_module(name, module)


def saved_copy_wrapper(head: nn.Linear) -> nn.Module:
    """peft's ModulesToSaveWrapper (modules_to_save=["lm_head"]) whose trainable copy is `head`. The original it
    wraps is all zeros: a loss computed through it instead would differ."""
    original = nn.Linear(head.in_features, head.out_features, bias=head.bias is not None, dtype=head.weight.dtype,
                         device=head.weight.device)
    nn.init.zeros_(original.weight)
    model = peft.get_peft_model(_Holder(original, q=nn.Linear(2, 2)),
                                peft.LoraConfig(r=1, target_modules=["q"], modules_to_save=["lm_head"]))
    wrapper = model.base_model.model.lm_head
    wrapper.modules_to_save["default"] = head
    return wrapper


def stored_dtype(data, dtype):
    """The dtype the inputs are stored in: `dtype`, or for fp16 / bf16 sometimes fp32 under torch.autocast(dtype)
    (the op casts hidden, weight and bias; values not exact in `dtype`: two more roundings on every path)."""
    if dtype != torch.float32 and data.draw(st.booleans(), label="fp32 inputs under autocast"):
        return torch.float32
    return dtype


def autocast(device, dtype, store):
    return torch.autocast(torch.device(device).type, dtype=dtype, enabled=store != dtype)


def cpu(t):
    """The references run in fp64 on the CPU."""
    return None if t is None else t.detach().cpu()


def draw_head(data, kind, dtype, H, V, device="cpu"):
    """A head module with drawn tensors in drawn layouts. Returns (module, trainable {name: tensor}, facts): facts
    are W (fp64, dequantized for NF4), W_mag, bias, adapters [(A, B, s)], dropout p in effect, nf4 (bool)."""
    W = tensor(data, (V, H), dtype, label="weight", scale=0.3, device=device)
    b = tensor(data, (V,), dtype, label="bias", device=device) if data.draw(st.booleans(), label="bias") else None
    bias_grad = b is not None and data.draw(st.booleans(), label="bias grad")
    facts = dict(W=cpu(W), W_mag=None, bias=cpu(b), adapters=[], p=0.0, nf4=kind in ("nf4", "qlora"))
    trainable = {}
    if facts["nf4"]:
        qweight = quantize_nf4(W.contiguous(), blocksize=data.draw(st.sampled_from([32, 64]), label="blocksize"),
                               double_quant=data.draw(st.booleans(), label="double quant"))
        facts["W"], facts["W_mag"] = map(cpu, ref.nf4_dequantize_f64(qweight))
        base = NF4Linear(H, V, bias=False, weight=qweight)
    else:
        base = nn.Linear(H, V, bias=False, dtype=dtype, device=device)
        w_grad = kind in ("linear", "modules_to_save") and data.draw(st.booleans(), label="weight grad")
        base.weight = nn.Parameter(W.detach(), requires_grad=w_grad)
        if w_grad:
            trainable["weight"] = base.weight
    if b is not None:
        base.bias = nn.Parameter(b.detach(), requires_grad=bias_grad)
        if bias_grad:
            trainable["bias"] = base.bias
    if kind in ("linear", "nf4"):
        return base, trainable, facts
    if kind == "modules_to_save":
        return saved_copy_wrapper(base), trainable, facts

    p = data.draw(st.sampled_from([0.0, 0.3]), label="lora_dropout")
    r = dim(data, 1, 33, label="r")
    config = dict(target_modules=["lm_head"], lora_dropout=p)
    model = (peft.get_peft_model if kind == "peft_lora" else fastft.get_peft_model)(
        _Holder(base), peft.LoraConfig(r=r, lora_alpha=data.draw(st.sampled_from([1, 8, 16, 2 * r]), label="alpha"),
                                       **config))
    names = ["default"]
    # two active: one of summed rank (without dropout: with it, peft draws a mask per adapter and the head is refused)
    if kind == "peft_lora" and p == 0.0 and data.draw(st.booleans(), label="second adapter"):
        r2 = dim(data, 1, 9, label="r2")
        model.add_adapter("second", peft.LoraConfig(r=r2, lora_alpha=data.draw(st.sampled_from([1, 5]), label="alpha2"),
                                                    **config))
        names.append("second")
    head = model.base_model.model.lm_head
    head.set_adapter(names)
    # frozen adapters (and base), reduction "none": the op's dh-only path
    adapters_grad = data.draw(st.booleans(), label="adapters trainable")
    for i, name in enumerate(names):
        adapter_dtype = data.draw(st.sampled_from([dtype, torch.float32]), label=f"adapter {i} dtype")
        rank = head.r[name]
        A = tensor(data, (rank, H), adapter_dtype, label=f"lora_A{i}", scale=0.3, device=device)
        B = tensor(data, (V, rank), adapter_dtype, label=f"lora_B{i}", scale=0.3, device=device)
        head.lora_A[name].weight = nn.Parameter(A.detach(), requires_grad=adapters_grad)
        head.lora_B[name].weight = nn.Parameter(B.detach(), requires_grad=adapters_grad)
        if adapters_grad:
            trainable[f"lora_A{i}"], trainable[f"lora_B{i}"] = head.lora_A[name].weight, head.lora_B[name].weight
        facts["adapters"].append((cpu(A), cpu(B), float(head.scaling[name])))
    training = p == 0.0 or data.draw(st.booleans(), label="training mode")  # eval mode: no dropout
    head.train(training)
    facts["p"] = p if training else 0.0
    if bias_grad:  # peft froze the base bias; a caller may train it (bias="all")
        base.bias.requires_grad_(True)
    return head, trainable, facts


def rounds(facts, blocks):
    """(logit, gradient) rounding counts of a head (see the constants above). NF4 dh: dlogits, W to the dtype, one
    per vocab block, grad_output's cast and product; the sum with a LoRA term one more."""
    lora = bool(facts["adapters"])
    logit = NF4_LOGIT_ROUND if facts["nf4"] else LOGIT_N_ROUND
    grad = (4 + blocks if facts["nf4"] else GRAD_N_ROUND) + lora
    return (max(logit, LORA_LOGIT_ROUND), max(grad, LORA_GRAD_ROUND)) if lora else (logit, grad)


def masks_of(masks, facts, T):
    if facts["p"] == 0.0:
        assert not masks, "dropout masks drawn for a head without dropout in effect"
        return None
    if T == 0:
        return torch.ones(0, facts["W"].shape[1], dtype=torch.bool)
    chain, t0 = [], 0  # the chunks' masks, each starting where the last ended
    while t0 < T:
        assert t0 in masks, f"no dropout mask drawn for the chunk at row {t0}"
        chain.append(masks[t0])
        t0 += masks[t0].shape[0]
    return cpu(torch.cat(chain))


def draw_lm_head_problem(data, backend, kind, *, device="cpu", max_rows=24, max_hidden=40, max_vocab=64,
                         rows_per_chunk=ROWS_PER_CHUNK):
    """A random lm_head_cross_entropy call on a `kind` head: a dict of its arguments (hidden, head, labels and the
    options), what the checks need (dtype, store, rows per chunk, trainable, facts, grad_output g, w_rows, den)."""
    dtype = data.draw(float_dtypes(), label="dtype")
    store = stored_dtype(data, dtype)
    lead = data.draw(st.sampled_from([(), (2, 3), (1,)]), label="leading dims")  # (): T drawn, 0 to max_rows
    lead = lead or (dim(data, 0, max_rows, label="T"),)
    H, V = dim(data, 1, max_hidden, label="H"), dim(data, 1, max_vocab, label="V")
    ignore_index, reduction, num_items, smoothing, softcap = draw_ce_options(data)
    T = math.prod(lead)
    if kind in ("nf4", "qlora"):  # each vocab block of each chunk is one dequantization call: keep their count small
        rows_per_chunk = [n for n in rows_per_chunk
                          if n is None or -(-T // n) * nf4_vocab_blocks(n, V, H, dtype, backend) <= MAX_NF4_BLOCK_CALLS]
    rows = data.draw(st.sampled_from(rows_per_chunk), label="rows per chunk")
    h = tensor(data, lead + (H,), store, label="hidden", requires_grad=True, device=device)
    head, trainable, facts = draw_head(data, kind, store, H, V, device)
    labels = _labels(data, lead, V, ignore_index)
    g, w_rows, den = _row_weights(data, reduction, lead, dtype, int((labels != ignore_index).sum()), num_items)
    return dict(hidden=h, head=head, labels=labels, ignore_index=ignore_index, reduction=reduction,
                label_smoothing=smoothing, softcap=softcap, num_items=num_items, dtype=dtype, store=store, rows=rows,
                trainable=trainable, facts=facts, g=g, w_rows=w_rows, den=den)


def run_lm_head_cross_entropy(data, backend, kind, *, device="cpu", **limits):
    op = "lm_head_cross_entropy"
    pb = draw_lm_head_problem(data, backend, kind, device=device, **limits)
    h, head, labels, trainable, facts = (pb[n] for n in ("hidden", "head", "labels", "trainable", "facts"))
    ignore_index, reduction, num_items, smoothing, softcap = (pb[n] for n in ("ignore_index", "reduction", "num_items",
                                                                             "label_smoothing", "softcap"))
    dtype, store, rows, g, w_rows, den = (pb[n] for n in ("dtype", "store", "rows", "g", "w_rows", "den"))
    lead, (H, V) = tuple(labels.shape), facts["W"].shape[::-1]
    T = math.prod(lead)
    inputs = {"x": h} | trainable

    with steered(backend, rows, V, dtype), captured_masks() as masks, autocast(device, dtype, store):
        loss = lm_head_cross_entropy(h, head, labels.to(device), ignore_index=ignore_index, reduction=reduction,
                                     label_smoothing=smoothing, softcap=softcap, num_items=num_items)
        grads = grads_of(loss, inputs, g.to(device))
    assert loss.dtype == torch.float32 and tuple(loss.shape) == (lead if reduction == "none" else ())
    loss, grads = cpu(loss), {n: cpu(t) for n, t in grads.items()}

    keep, p = masks_of(masks, facts, T), facts["p"]
    n_logit, n_grad = rounds(facts, nf4_vocab_blocks(rows, V, H, dtype, backend))
    n_logit, n_grad = n_logit + 2 * (store != dtype), n_grad + 2 * (store != dtype)  # autocast: h and W cast
    r = sum(A.shape[0] for A, _, _ in facts["adapters"])
    extra = DEQUANT_REL if facts["nf4"] else 0.0
    h2 = cpu(h).reshape(T, H)
    z, zmag = ref.head_logits(h2, facts["W"], facts["bias"], facts["adapters"], keep, p, facts["W_mag"])
    u, u32 = ref.UNIT_ROUNDOFF[dtype], ref.UNIT_ROUNDOFF[torch.float32]
    e = (n_logit * u + ref.LAMBDA * u32 * (math.sqrt(H) + (math.sqrt(r) if r else 0.0)) + extra) * zmag \
        + n_logit * ref.SUBNORMAL[dtype]
    rows_, dz, loss_err, dz_mag, dz_err = ref.ce_rows(z, e, labels.reshape(-1), ignore_index, smoothing, softcap)
    _check_reduced(op, f"{backend} {kind} loss[{reduction}]", loss, reduction, rows_, loss_err, den, dtype)
    w = w_rows[:, None]
    expected = ref.head_grads_lora(h2, facts["W"], w * dz, w.abs() * dz_mag, w.abs() * dz_err, facts["adapters"],
                                   keep, p, facts["W_mag"])
    fixed = {"x": (V, r), "weight": (T,), "bias": (T,)}
    lengths = {n: fixed.get(n) or ((V, T) if n.startswith("lora_A") else (r, T)) for n in inputs}
    check_grads(op, f"{backend} {kind}", inputs, grads, expected, dtype, n_grad, lengths, extra, reshape=True)
    ref.count_example(f"{op}[{backend}]")


def draw_dpo_problem(data, *, device="cpu", max_batch=3, max_seq=9, max_hidden=40, max_vocab=64,
                     rows_per_chunk=ROWS_PER_CHUNK):
    """A random linear_dpo_loss call: a dict of its arguments (hidden, weight, labels, reference log-probs, beta,
    ignore_index, bias) and what the checks need (dtype, store, rows per chunk, grad_output g)."""
    dtype = data.draw(float_dtypes(), label="dtype")
    store = stored_dtype(data, dtype)
    Bn = dim(data, 1, max_batch, label="B")
    Sc, Sr = dim(data, 0, max_seq, label="S chosen"), dim(data, 0, max_seq, label="S rejected")
    H, V = dim(data, 1, max_hidden, label="H"), dim(data, 1, max_vocab, label="V")
    beta = data.draw(st.sampled_from([0.1, 0.5, 2.0, 0.03]), label="beta")
    ignore_index = data.draw(st.sampled_from([-100, -1]), label="ignore_index")
    rows = data.draw(st.sampled_from(rows_per_chunk), label="rows per chunk")
    on = dict(device=device, requires_grad=True)
    hc = tensor(data, (Bn, Sc, H), store, label="chosen hidden", **on)
    hr = tensor(data, (Bn, Sr, H), store, label="rejected hidden", **on)
    W = tensor(data, (V, H), store, label="weight", scale=0.3, device=device,
               requires_grad=data.draw(st.booleans(), label="weight grad"))  # frozen: the dh-only path
    b = tensor(data, (V,), store, label="bias", device=device,
               requires_grad=data.draw(st.booleans(), label="bias grad")) if data.draw(st.booleans(), label="bias") \
        else None
    lab_c, lab_r = _labels(data, (Bn, Sc), V, ignore_index), _labels(data, (Bn, Sr), V, ignore_index)
    ref_dtype = data.draw(st.sampled_from([torch.float32, dtype]), label="reference logps dtype")
    ref_grad = data.draw(st.booleans(), label="reference logps grad")
    ref_c = tensor(data, (Bn,), ref_dtype, label="ref chosen", scale=5.0, device=device, requires_grad=ref_grad)
    ref_r = tensor(data, (Bn,), ref_dtype, label="ref rejected", scale=5.0, device=device, requires_grad=ref_grad)
    g = data.draw(st.sampled_from(SCALAR_GRADS), label="grad_output")
    return dict(policy_chosen_hidden=hc, policy_rejected_hidden=hr, weight=W, chosen_labels=lab_c,
                rejected_labels=lab_r, ref_chosen_logps=ref_c, ref_rejected_logps=ref_r, beta=beta,
                ignore_index=ignore_index, bias=b, dtype=dtype, store=store, rows=rows, g=g)


def run_linear_dpo_loss(data, backend, *, device="cpu", **limits):
    op = "linear_dpo_loss"
    pb = draw_dpo_problem(data, device=device, **limits)
    hc, hr, W, b, lab_c, lab_r, ref_c, ref_r = (pb[n] for n in (
        "policy_chosen_hidden", "policy_rejected_hidden", "weight", "bias", "chosen_labels", "rejected_labels",
        "ref_chosen_logps", "ref_rejected_logps"))
    dtype, store, rows, g, beta, ignore_index = (pb[n] for n in ("dtype", "store", "rows", "g", "beta", "ignore_index"))
    (Bn, Sc, H), Sr, V, ref_dtype = hc.shape, hr.shape[1], W.shape[0], ref_c.dtype
    inputs = needing_grad((("chosen_x", hc), ("rejected_x", hr), ("weight", W), ("bias", b), ("ref_chosen", ref_c),
                           ("ref_rejected", ref_r)))

    with steered(backend, rows, V, dtype), autocast(device, dtype, store):
        loss, rewards_c, rewards_r = linear_dpo_loss(hc, hr, W, lab_c.to(device), lab_r.to(device),
                                                     ref_chosen_logps=ref_c, ref_rejected_logps=ref_r, beta=beta,
                                                     ignore_index=ignore_index, bias=b)
        grads = grads_of(loss, inputs, torch.tensor(g, device=device))
    assert loss.dtype == torch.float32 and loss.shape == () and rewards_c.shape == rewards_r.shape == (Bn,)
    loss, rewards_c, rewards_r = cpu(loss), cpu(rewards_c), cpu(rewards_r)
    grads = {n: cpu(t) for n, t in grads.items()}
    hc, hr, W, b, ref_c, ref_r = map(cpu, (hc, hr, W, b, ref_c, ref_r))

    per_side = []
    for hh, lab, S in ((hc, lab_c, Sc), (hr, lab_r, Sr)):
        z, e = ref.logit_error(hh.reshape(-1, H), W, b, dtype, LOGIT_N_ROUND + 2 * (store != dtype))
        per_side.append(ref.ce_rows(z, e, lab.reshape(-1), ignore_index))
    (rows_c, dz_c, err_c, mag_c, derr_c), (rows_r, dz_r, err_r, mag_r, derr_r) = per_side
    dpo = ref.dpo_terms(rows_c.view(Bn, Sc), err_c.view(Bn, Sc), rows_r.view(Bn, Sr), err_r.view(Bn, Sr), ref_c, ref_r,
                        beta)
    ref.check(op, f"{backend} loss", loss, dpo["loss"], dpo["loss_mag"], dtype, 0, (),
              abs_floor=float(dpo["loss_err"]) + FP32_TINY)
    for side, out in (("c", rewards_c), ("r", rewards_r)):
        reward = dpo[f"reward_{side}"]
        ref.check(op, f"{backend} rewards_{side}", out, reward, reward.abs(), dtype, 0, (),
                  abs_floor=dpo[f"reward_{side}_err"] + FP32_TINY)
    # d loss/d(token loss): +g·w for chosen tokens (π = −Σ token losses), −g·w for rejected; w's error g·w_err
    w, w_err = g * dpo["w"], abs(g) * dpo["w_err"]
    w_rows = torch.cat([w[:, None].expand(Bn, Sc).reshape(-1), -w[:, None].expand(Bn, Sr).reshape(-1)])[:, None]
    w_err_rows = torch.cat([w_err[:, None].expand(Bn, Sc).reshape(-1), w_err[:, None].expand(Bn, Sr).reshape(-1)])
    dz, dz_mag = torch.cat([dz_c, dz_r]), torch.cat([mag_c, mag_r])
    G, Gm = w_rows * dz, w_rows.abs() * dz_mag
    Ge = w_rows.abs() * torch.cat([derr_c, derr_r]) + w_err_rows[:, None] * dz_mag
    h_rows = torch.cat([ref.f64(hc).reshape(-1, H), ref.f64(hr).reshape(-1, H)])
    expected = ref.head_grads_lora(h_rows, W, G, Gm, Ge)
    n_c = Bn * Sc
    split = {"chosen_x": slice(0, n_c), "rejected_x": slice(n_c, None)}
    T = h_rows.shape[0]
    for name, t in inputs.items():
        if name.startswith("ref_"):  # d loss/d ref_c = g·w, d loss/d ref_r = −g·w; cast back to their dtype
            sign = 1.0 if name == "ref_chosen" else -1.0
            ref.check(op, f"{backend} d{name}", grads[name], sign * w, w.abs(), ref_dtype, 1, (),
                      abs_floor=w_err + FP32_TINY)
        else:
            exact, mag, err = expected["x" if name in split else name]
            if name in split:
                exact, mag, err = (v[split[name]] for v in (exact, mag, err))
            ref.check(op, f"{backend} d{name}", grads[name].reshape(exact.shape), exact, mag, dtype,
                      GRAD_N_ROUND + 2 * (store != dtype), (V,) if name in split else (T,), abs_floor=err)
        assert grads[name].dtype == t.dtype, f"{op} d{name} should come back in {t.dtype}, got {grads[name].dtype}"
    ref.count_example(f"{op}[{backend}]")


@pytest.mark.parametrize("kind", HEADS)
@pytest.mark.parametrize("backend", BACKENDS)
@fuzz(16)
@given(data=st.data())
def test_lm_head_cross_entropy(data, backend, kind):
    run_lm_head_cross_entropy(data, backend, kind)


@pytest.mark.parametrize("backend", BACKENDS)
@fuzz(20)
@given(data=st.data())
def test_linear_dpo_loss(data, backend):
    run_linear_dpo_loss(data, backend)


# GPU: larger shapes, natively (backend "triton" is what "auto" picks there); never small chunks of a large vocab
GPU_ROWS_PER_CHUNK = (None, 7, 64, 100)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", HEADS)
@pytest.mark.parametrize("backend", ["triton", "torch"])
@fuzz(8)
@given(data=st.data())
def test_lm_head_cross_entropy_gpu(data, backend, kind, exact_cuda_reductions):
    run_lm_head_cross_entropy(data, backend, kind, device="cuda", max_rows=300, max_hidden=520, max_vocab=1000,
                              rows_per_chunk=GPU_ROWS_PER_CHUNK)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "torch"])
@fuzz(12)
@given(data=st.data())
def test_linear_dpo_loss_gpu(data, backend, exact_cuda_reductions):
    run_linear_dpo_loss(data, backend, device="cuda", max_batch=4, max_seq=70, max_hidden=520, max_vocab=1000,
                        rows_per_chunk=GPU_ROWS_PER_CHUNK)
