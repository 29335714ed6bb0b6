"""Fused linear losses (fastft.ops.linear_losses) against fp64 plain-torch references: cross-entropy (fuzzed shapes,
dtypes, options, reductions, grad_output), gradient accumulation with num_items, LoRA and NF4 lm_heads, KL
distillation, sequence log-probs and DPO, the Triton row kernels against their torch twins, and bad input."""
import random
import warnings

import peft
import pytest
import torch
import torch.nn.functional as F
import transformers
from torch import nn

import fastft
from fastft.kernels.runtime import HAS_TRITON
from fastft.modules.lora import FusedLoraLinear
from fastft.modules.nf4_linear import NF4Linear
from fastft.modules.qlora import FusedQLoraLinear
from fastft.ops import (linear_cross_entropy, linear_cross_entropy_reference, linear_dpo_loss,
                        linear_dpo_loss_reference, linear_kl_div, linear_kl_div_reference, linear_sequence_logprobs,
                        linear_sequence_logprobs_reference, lm_head_cross_entropy)
from fastft.ops import chunked_logits
from fastft.ops.chunked_logits import ce_rows_torch, chunk_rows, kl_rows_torch
from tests.utils import TOL, interpreter_only, rel_err

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
GRAD_TOL = {torch.float32: 2e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}


def _leaf(t, dtype=None):
    return t.detach().to(dtype or t.dtype).requires_grad_()


def _grads(loss, inputs, grad_output=None):
    return torch.autograd.grad(loss, inputs, grad_output, allow_unused=True)


def _assert_grads(got, ref, dtype, names):
    for name, g, r in zip(names, got, ref):
        if r is None:
            assert g is None, f"{name}: got a gradient where the reference has none"
            continue
        assert g is not None and g.dtype == dtype, f"{name}: gradient missing or not {dtype}"
        err = rel_err(g, r)
        assert err <= GRAD_TOL[dtype], f"d{name}: relative error {err:.2e} > {GRAD_TOL[dtype]:.0e} ({dtype})"


def _ce_case(seed):
    """Random shapes and options: T not a multiple of the chunk, odd V, ignored rows, 2-D labels."""
    rnd = random.Random(seed)
    dtype = DTYPES[seed % 3]
    lead = rnd.choice([(rnd.randint(1, 70),), (rnd.randint(1, 4), rnd.randint(1, 19))])
    H, V = rnd.choice([8, 24, 40]), rnd.choice([1, 7, 101, 131, 160])
    opts = dict(reduction=rnd.choice(["mean", "sum", "none"]), label_smoothing=rnd.choice([0.0, 0.0, 0.1, 1.0]),
                softcap=rnd.choice([None, None, 2.5]), ignore_index=rnd.choice([-100, 3]))
    if opts["reduction"] == "mean" and rnd.random() < 0.3:
        opts["num_items"] = rnd.choice([5, torch.tensor(13.0)])
    return dtype, lead, H, V, opts, rnd.choice([1, 7, 16, 64]), rnd.random() < 0.5, rnd.random() < 0.5


def _inputs(lead, H, V, dtype, ignore_index, *, bias, noncontiguous):
    hidden = torch.randn(*lead, 2 * H if noncontiguous else H)
    if noncontiguous:
        hidden = hidden[..., ::2]  # a strided view, last stride 2
    weight = torch.randn(V, H) * H**-0.5 * 4
    b = torch.randn(V) if bias else None
    labels = torch.randint(0, V, lead)
    labels[torch.rand(lead) < 0.25] = ignore_index
    return hidden.to(dtype), weight.to(dtype), None if b is None else b.to(dtype), labels


@pytest.mark.parametrize("seed", range(18))
def test_cross_entropy_matches_fp64_reference(seed, monkeypatch):
    dtype, lead, H, V, opts, chunk, bias, noncontig = _ce_case(seed)
    if seed % 2:  # dW accumulated in W's dtype (what a large vocab gets) instead of fp32
        monkeypatch.setattr(chunked_logits, "FP32_WEIGHT_GRAD_MIB", 0)
    hidden, weight, b, labels = _inputs(lead, H, V, dtype, opts["ignore_index"], bias=bias, noncontiguous=noncontig)
    if V > 3 and opts["ignore_index"] == 3:
        labels[labels == 3] = 2  # the ignore_index 3 also in range: make sure rows with it are the only ignored ones
        labels.view(-1)[::5] = 3
    leaves = [_leaf(t) for t in (hidden, weight, b) if t is not None]
    loss = linear_cross_entropy(leaves[0], leaves[1], labels, bias=leaves[2] if bias else None, backend="torch",
                                chunk_size=chunk, **opts)
    refs = [_leaf(t, torch.float64) for t in leaves]
    loss_ref = linear_cross_entropy_reference(refs[0], refs[1], labels, bias=refs[2] if bias else None, **opts)
    assert loss.dtype == torch.float32 and loss.shape == loss_ref.shape
    assert rel_err(loss, loss_ref) <= TOL[dtype] + 1e-6
    go = torch.randn(loss.shape, dtype=torch.float64) * 3  # grad_output != 1, per token for "none"
    _assert_grads(_grads(loss, leaves, go.float()), _grads(loss_ref, refs, go), dtype, ["hidden", "weight", "bias"])


@interpreter_only
def test_cross_entropy_triton_backend():
    dtype = torch.bfloat16  # every dtype of the kernel itself: test_row_kernels_match_torch_rows
    hidden, weight, b, labels = _inputs((2, 11), 24, 131, dtype, -100, bias=True, noncontiguous=True)
    leaves = [_leaf(t) for t in (hidden, weight, b)]
    refs = [_leaf(t, torch.float64) for t in leaves]
    opts = dict(label_smoothing=0.1, softcap=3.0)
    loss = linear_cross_entropy(*leaves[:2], labels, bias=leaves[2], backend="triton", chunk_size=16, **opts)
    loss_ref = linear_cross_entropy_reference(*refs[:2], labels, bias=refs[2], **opts)
    assert rel_err(loss, loss_ref) <= TOL[dtype]
    _assert_grads(_grads(loss * 2.5, leaves), _grads(loss_ref * 2.5, refs), dtype, ["hidden", "weight", "bias"])


@interpreter_only
@pytest.mark.parametrize("dtype", DTYPES)
def test_row_kernels_match_torch_rows(dtype):
    from fastft.kernels.cross_entropy import ce_rows, kl_rows

    n, V = 6, 131  # three 64-wide blocks, the last ragged
    x, t = torch.randn(n, V).to(dtype) * 4, torch.randn(n, V).to(dtype) * 4
    labels = torch.randint(0, V, (n,))
    labels[1] = -100
    cases = ((torch.tensor([0.7]), dict(label_smoothing=0.0, softcap=None)),
             (torch.randn(n), dict(label_smoothing=0.2, softcap=2.0)))
    for scale, kw in cases:
        a, b = x.clone(), x.clone()
        loss = ce_rows(a, labels, scale, ignore_index=-100, compute_grad=True, **kw)
        loss_ref = ce_rows_torch(b, labels, scale, ignore_index=-100, compute_grad=True, **kw)
        assert rel_err(loss, loss_ref) <= 1e-5 and rel_err(a, b) <= TOL[dtype], kw
        assert torch.equal(a[1], torch.zeros_like(a[1]))  # ignored row: zero gradient
    for reverse, scale in ((False, torch.tensor([0.7])), (True, torch.randn(n))):
        a, b = x.clone(), x.clone()
        kl = kl_rows(a, t, labels, scale, ignore_index=-100, temperature=1.7, reverse=reverse, compute_grad=True)
        kl_ref = kl_rows_torch(b, t, labels, scale, ignore_index=-100, temperature=1.7, reverse=reverse,
                               compute_grad=True)
        assert rel_err(kl, kl_ref) <= 1e-5 and rel_err(a, b) <= TOL[dtype], reverse
    untouched = x.clone()
    ce_rows(untouched, labels, torch.ones(1), ignore_index=-100, label_smoothing=0.0, softcap=None, compute_grad=False)
    assert torch.equal(untouched, x)  # losses only: the chunk is left alone


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=interpreter_only)])
def test_all_ignored_and_empty(backend):
    hidden, weight = _leaf(torch.randn(5, 8)), _leaf(torch.randn(11, 8))
    labels = torch.full((5,), -100)
    loss = linear_cross_entropy(hidden, weight, labels, backend=backend)
    gh, gw = _grads(loss, [hidden, weight])
    assert loss.item() == 0.0 and not gh.any() and not gw.any()  # 0, not torch's NaN, for "mean" over no tokens
    empty = _leaf(torch.randn(0, 8))
    loss = linear_cross_entropy(empty, weight, torch.zeros(0, dtype=torch.long), backend=backend)
    assert loss.item() == 0.0 and _grads(loss, [empty])[0].shape == (0, 8)


def test_gradient_accumulation_with_num_items_equals_one_batch():
    """4 micro-batches with unequal counts of valid tokens, each divided by the total count, sum to the big batch."""
    H, V = 16, 37
    weight = _leaf(torch.randn(V, H))
    hiddens = [torch.randn(n, H) for n in (5, 17, 9, 30)]
    labels = [torch.randint(0, V, (h.shape[0],)) for h in hiddens]
    for lab, k in zip(labels, (0, 3, 8, 1)):
        lab[:k] = -100
    total = sum(int((lab != -100).sum()) for lab in labels)
    big_h = _leaf(torch.cat(hiddens))
    big = linear_cross_entropy(big_h, weight, torch.cat(labels), backend="torch", chunk_size=8)
    g_big = _grads(big, [big_h, weight])
    micro_h = [_leaf(h) for h in hiddens]
    losses, gw = [], torch.zeros_like(weight)
    for i, (h, lab) in enumerate(zip(micro_h, labels)):
        n = torch.tensor(total) if i % 2 else total  # an int or a tensor
        loss = linear_cross_entropy(h, weight, lab, num_items=n, backend="torch", chunk_size=8)
        losses.append(loss)
        gw += _grads(loss, [weight])[0] if i % 2 else torch.autograd.grad(loss, [weight])[0]
    assert torch.allclose(sum(losses), big, rtol=1e-5)
    assert rel_err(gw, g_big[1]) <= 1e-5
    micro_losses = [linear_cross_entropy(h, weight, lab, num_items=total, backend="torch") for h, lab in
                    zip(micro_h, labels)]
    dh = torch.autograd.grad(sum(micro_losses), micro_h)
    assert rel_err(torch.cat(dh), g_big[0]) <= 1e-5


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=interpreter_only)])
def test_fp16_gradients_do_not_flush_to_zero(backend):
    """A mean over many tokens makes every dlogit tiny; fp16 chunks keep them unscaled until backward."""
    hidden, weight, _, labels = _inputs((40,), 16, 300, torch.float16, -100, bias=False, noncontiguous=False)
    leaves = [_leaf(hidden), _leaf(weight)]
    loss = linear_cross_entropy(*leaves, labels, num_items=2_000_000, backend=backend, chunk_size=16)
    refs = [_leaf(t, torch.float64) for t in leaves]
    ref = linear_cross_entropy_reference(*refs, labels, num_items=2_000_000)
    scale = 2.0**16  # what a loss scaler multiplies in
    _assert_grads(_grads(loss * scale, leaves), _grads(ref * scale, refs), torch.float16, ["hidden", "weight"])


def test_autocast_and_frozen_weight():
    hidden, weight = _leaf(torch.randn(2, 9, 16)), torch.randn(23, 16)
    labels = torch.randint(0, 23, (2, 9))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(hidden, weight, labels)
    (gh,) = _grads(loss, [hidden])
    ref_h = _leaf(hidden, torch.float64)
    ref = linear_cross_entropy_reference(ref_h, weight.double(), labels)
    assert gh.dtype == torch.float32 and rel_err(loss, ref) <= 2e-2 and rel_err(gh, _grads(ref, [ref_h])[0]) <= 3e-2
    with torch.no_grad():
        assert torch.allclose(linear_cross_entropy(hidden, weight, labels), ref.float(), rtol=1e-5)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=interpreter_only)])
def test_per_token_losses_with_a_frozen_head(backend):
    """reduction="none" with only dh wanted: dh made in the forward, rows scaled by grad_output in backward."""
    hidden, weight, _, labels = _inputs((3, 7), 16, 67, torch.float32, -100, bias=False, noncontiguous=True)
    hidden = _leaf(hidden)
    loss = linear_cross_entropy(hidden, weight, labels, reduction="none", softcap=4.0, backend=backend, chunk_size=5)
    ref_h = _leaf(hidden, torch.float64)
    ref = linear_cross_entropy_reference(ref_h, weight.double(), labels, reduction="none", softcap=4.0)
    assert rel_err(loss, ref) <= 1e-5
    for _ in range(2):  # nothing is scaled in place: a second backward through the graph agrees
        go = torch.randn(3, 7, dtype=torch.float64)
        (g,) = torch.autograd.grad(loss, [hidden], go.float(), retain_graph=True)
        assert rel_err(g, torch.autograd.grad(ref, [ref_h], go, retain_graph=True)[0]) <= 1e-5


def test_chunk_rows_bounds_the_buffer():
    assert chunk_rows(8192, 128256, 2, 96 * 2**20) == 384  # 94 MiB of bf16 logits at Llama-3's vocab
    assert chunk_rows(10, 128256, 2, 96 * 2**20) == 10
    assert chunk_rows(8192, 10**9, 4, 2**20) == 1
    assert 100 * 37 * 2 <= 2**20 and chunk_rows(100, 37, 2, 2**20) == 100


# ------------------------------------------------------------------------------------------------
# lm_head modules: LoRA (peft's and fastft's) and NF4

class _Holder(nn.Module):
    def __init__(self, lm_head):
        super().__init__()
        self.lm_head = lm_head


def _lora_head(kind, H=24, V=53, r=4, dropout=0.0, bias=True):
    torch.manual_seed(1)
    linear = nn.Linear(H, V, bias=bias)
    config = peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=["lm_head"], lora_dropout=dropout)
    base = NF4Linear.from_linear(linear) if kind == "fastft-nf4" else linear
    model = (peft.get_peft_model if kind == "peft" else fastft.get_peft_model)(_Holder(base), config)
    head = model.base_model.model.lm_head
    with torch.no_grad():
        head.lora_B["default"].weight.normal_(std=0.3)
    return head


@pytest.mark.parametrize("kind", ["peft", "fastft", "fastft-nf4"])
def test_lora_lm_head_gradients_match_peft(kind, monkeypatch):
    monkeypatch.setenv("FASTFT_LORA_BACKEND", "torch")
    head = _lora_head(kind)
    assert isinstance(head, {"peft": peft.tuners.lora.Linear, "fastft": FusedLoraLinear,
                             "fastft-nf4": FusedQLoraLinear}[kind])
    A, B = head.lora_A["default"].weight, head.lora_B["default"].weight
    bias = head.get_base_layer().bias
    hidden = _leaf(torch.randn(3, 11, 24))
    labels = torch.randint(0, 53, (3, 11))
    labels[0, :4] = -100
    params = [hidden, A, B] + ([bias] if bias.requires_grad else [])  # peft freezes the base bias
    loss = lm_head_cross_entropy(hidden, head, labels, label_smoothing=0.05)
    got = _grads(loss * 1.5, params)
    ref = F.cross_entropy(head(hidden).reshape(-1, 53).float(), labels.reshape(-1), label_smoothing=0.05)
    want = _grads(ref * 1.5, params)
    assert torch.allclose(loss, ref, rtol=1e-5, atol=1e-6)
    for name, g, w in zip(["hidden", "lora_A", "lora_B", "bias"], got, want):
        assert rel_err(g, w) <= 1e-5, name
    assert head.get_base_layer().weight.__class__.__name__ == ("NF4Weight" if kind == "fastft-nf4" else "Parameter")


def test_lora_lm_head_dropout_is_honoured(monkeypatch):
    """With dropout in training mode, the op draws its own keep-mask per chunk; the gradients equal peft's math on
    that same mask, and the masks differ from no dropout at all."""
    head = _lora_head("fastft", dropout=0.3).train()
    masks = []
    keep = chunked_logits.Head._keep
    monkeypatch.setattr(chunked_logits.Head, "_keep", lambda self, h, t0: masks.append(keep(self, h, t0)) or masks[-1])
    A, B = head.lora_A["default"].weight, head.lora_B["default"].weight
    base = head.get_base_layer()
    hidden = _leaf(torch.randn(40, 24))
    labels = torch.randint(0, 53, (40,))
    monkeypatch.setenv("FASTFT_LOSS_CHUNK_MIB", str(16 * 53 * 16 / 2**20))  # 16 rows per chunk: 3 chunks
    loss = lm_head_cross_entropy(hidden, head, labels)
    got = _grads(loss, [hidden, A, B])
    assert len(masks) == 6  # per chunk: one draw for the logits, one for dh (gradients are made in the forward)
    assert all(torch.equal(a, b) for a, b in zip(masks[0::2], masks[1::2]))
    mask = torch.cat(masks[0::2])
    assert mask.shape == hidden.shape and 0.5 < mask.float().mean() < 0.9
    assert not torch.equal(masks[0][:8], masks[2][:8])  # each chunk its own draw
    logits = base(hidden) + head.scaling["default"] * F.linear(F.linear(hidden * mask / 0.7, A), B)
    ref = F.cross_entropy(logits, labels)
    assert torch.allclose(loss, ref, rtol=1e-5)
    for name, g, w in zip(["hidden", "lora_A", "lora_B"], got, _grads(ref, [hidden, A, B])):
        assert rel_err(g, w) <= 1e-5, name


@pytest.mark.parametrize("adapters", ["one with dropout", "two without dropout"])
def test_lora_lm_head_per_token_losses_with_dropout_or_two_adapters(monkeypatch, adapters):
    """reduction="none" recomputes the logits in backward: the dropout mask drawn there must be the forward's; two
    active adapters (without dropout: peft draws a mask per adapter) act as one LoRA of summed rank."""
    torch.manual_seed(1)
    dropout = 0.2 if adapters == "one with dropout" else 0.0
    model = peft.get_peft_model(_Holder(nn.Linear(24, 53)), peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout,
                                                                           target_modules=["lm_head"]))
    head = model.base_model.model.lm_head.train()
    names = ["default"]
    if adapters == "two without dropout":
        model.add_adapter("second", peft.LoraConfig(r=3, lora_alpha=5, target_modules=["lm_head"],
                                                    init_lora_weights=False))
        names.append("second")
        head.set_adapter(names)
    with torch.no_grad():
        head.lora_B["default"].weight.normal_(std=0.3)
    masks = []
    keep = chunked_logits.Head._keep
    monkeypatch.setattr(chunked_logits.Head, "_keep", lambda self, h, t0: masks.append(keep(self, h, t0)) or masks[-1])
    monkeypatch.setenv("FASTFT_LOSS_CHUNK_MIB", str(16 * 53 * 16 / 2**20))
    hidden = _leaf(torch.randn(2, 15, 24))
    labels = torch.randint(0, 53, (2, 15))
    params = [hidden] + [p for n, p in head.named_parameters() if "lora_" in n]
    assert len(params) == 1 + 2 * len(names)
    loss = lm_head_cross_entropy(hidden, head, labels, reduction="none")
    go = torch.randn(2, 15)
    got = _grads(loss, params, go)
    mask = torch.ones_like(hidden)
    if dropout:  # forward: logits only, 2 chunks; backward draws each chunk's mask again (the forward's)
        assert loss.shape == (2, 15) and len(masks) == 6 and all(torch.equal(masks[i], masks[2 + 2 * i])
                                                                 for i in range(2))
        mask = torch.cat(masks[:2]).view(hidden.shape) / 0.8
    logits = head.get_base_layer()(hidden)
    for name in names:
        logits = logits + head.scaling[name] * head.lora_B[name](head.lora_A[name](hidden * mask))
    ref = F.cross_entropy(logits.reshape(-1, 53), labels.reshape(-1), reduction="none").view(2, 15)
    assert torch.allclose(loss, ref, rtol=1e-5, atol=1e-6)
    for g, w in zip(got, _grads(ref, params, go)):
        assert rel_err(g, w) <= 1e-5


def test_two_lm_head_adapters_with_dropout_are_refused_and_the_patched_model_gives_peft_loss():
    """Two active lm_head adapters with the same dropout rate: peft draws a mask per adapter, the fused loss drew
    one for both (adapter b = -adapter a then cancelled exactly: the loss with adapters disabled). The head is now
    refused (as different rates were), and a patched model falls back to its own head and loss: peft's losses."""
    from fastft.ops.lm_head import head_of_module

    def build(patch):
        torch.manual_seed(0)
        base = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
            vocab_size=64, tie_word_embeddings=False))
        config = lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=["lm_head"], lora_dropout=0.5)  # noqa: E731
        model = peft.get_peft_model(base, config())
        model.add_adapter("b", config())
        head = model.base_model.model.lm_head
        with torch.no_grad():
            head.lora_B["default"].weight.normal_()
            head.lora_B["b"].weight.copy_(-head.lora_B["default"].weight)
            head.lora_A["b"].weight.copy_(head.lora_A["default"].weight)
        model.base_model.set_adapter(["default", "b"])
        if patch:
            fastft.patch_model(model, backend="torch")
        return model.train()

    patched, ref = build(True), build(False)
    for check_only in (False, True):
        with pytest.raises(ValueError, match="peft draws a mask per adapter"):
            head_of_module("op", patched.base_model.model.lm_head, check_only=check_only)
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(3))
    with torch.no_grad(), ref.disable_adapter():
        base_loss = ref(input_ids=ids, labels=ids).loss
    for seed in range(2):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the fallback's note
            torch.manual_seed(seed)
            got = patched(input_ids=ids, labels=ids).loss
        torch.manual_seed(seed)
        want = ref(input_ids=ids, labels=ids).loss
        assert torch.allclose(got, want, rtol=1e-5) and not torch.allclose(got, base_loss, rtol=1e-3)


def test_two_lm_head_adapters_of_two_dtypes_run_in_the_widest():
    """A bf16 adapter beside an fp32 one on lm_head: the fused loss stacks them in fp32 whichever is listed first
    (it took the first's dtype: the fp32 adapter rounded to bf16 when listed second), as the fused layers do."""
    from fastft.ops.lm_head import head_of_module

    model = peft.get_peft_model(_Holder(nn.Linear(24, 53)), peft.LoraConfig(r=4, target_modules=["lm_head"]))
    model.add_adapter("second", peft.LoraConfig(r=3, target_modules=["lm_head"], init_lora_weights=False))
    head = model.base_model.model.lm_head
    head.lora_A["default"].to(torch.bfloat16)
    head.lora_B["default"].to(torch.bfloat16)
    for order in (["default", "second"], ["second", "default"]):
        head.set_adapter(order)
        args = head_of_module("op", head)
        assert args.lora_A.dtype == args.lora_B.dtype == torch.float32
        assert torch.equal(args.lora_A[-3:] if order[0] == "default" else args.lora_A[:3],
                           head.lora_A["second"].weight)


def test_head_check_only_builds_nothing_and_refuses_alike(monkeypatch):
    """The training loop asks for the verdict every step: check_only concatenates no factors, and refuses what
    the full read refuses."""
    from fastft.ops.lm_head import head_of_module
    model = peft.get_peft_model(_Holder(nn.Linear(24, 53)), peft.LoraConfig(r=4, target_modules=["lm_head"]))
    model.add_adapter("second", peft.LoraConfig(r=3, target_modules=["lm_head"]))
    head = model.base_model.model.lm_head
    head.set_adapter(["default", "second"])
    assert head_of_module("op", head).lora_A.shape[0] == 7
    monkeypatch.setattr(torch, "cat", lambda *a, **k: pytest.fail("check_only concatenated the factors"))
    assert head_of_module("op", head, check_only=True) is None
    head.lora_dropout["second"] = nn.Dropout(0.3)
    for check_only in (False, True):
        with pytest.raises(ValueError, match="have dropout"):
            head_of_module("op", head.train(), check_only=check_only)


def test_traces_under_torch_compile_without_graph_breaks():
    hidden, weight = torch.randn(2, 9, 16, requires_grad=True), torch.randn(33, 16, requires_grad=True)
    labels = torch.randint(0, 33, (2, 9))
    explained = torch._dynamo.explain(lambda h, w, y: linear_cross_entropy(h, w, y, backend="torch"))(hidden, weight,
                                                                                                         labels)
    assert explained.graph_break_count == 0, explained.break_reasons


def test_nf4_lm_head_matches_dequantized_dense(monkeypatch):
    torch.manual_seed(2)
    linear = nn.Linear(64, 300)
    head = NF4Linear.from_linear(linear)
    dense = head.dequantize_weight(torch.float32)
    calls = []
    dequantize_rows = type(head.weight).dequantize_rows
    monkeypatch.setattr(type(head.weight), "dequantize_rows",
                        lambda self, a, b, dtype=None: calls.append(b - a) or dequantize_rows(self, a, b, dtype))
    # 128 vocab rows; 9 tokens a chunk (fp32 logits + softcap's 20 B of temporaries a logit: 4 chunks of 34 tokens)
    monkeypatch.setenv("FASTFT_LOSS_CHUNK_MIB", str(2 * 64 * 4 * 128 / 2**20))
    hidden = _leaf(torch.randn(2, 17, 64))
    labels = torch.randint(0, 300, (2, 17))
    loss = lm_head_cross_entropy(hidden, head, labels, softcap=5.0)
    got = _grads(loss, [hidden, head.bias])
    assert max(calls) == 128 and sum(calls) == 4 * 2 * 300  # a vocab block at a time; per chunk: logits, dh
    ref_h = _leaf(hidden, torch.float64)
    ref_b = _leaf(head.bias, torch.float64)
    ref = linear_cross_entropy_reference(ref_h, dense.double(), labels, bias=ref_b, softcap=5.0)
    assert rel_err(loss, ref) <= 1e-5
    _assert_grads(got, _grads(ref, [ref_h, ref_b]), torch.float32, ["hidden", "bias"])


def test_modules_to_save_lm_head_trains_the_copy():
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.lm_head = nn.Linear(8, 8), nn.Linear(8, 13)

    model = peft.get_peft_model(Model(), peft.LoraConfig(r=2, target_modules=["q"], modules_to_save=["lm_head"]))
    wrapper = model.base_model.model.lm_head
    copy = wrapper.modules_to_save["default"]
    hidden, labels = torch.randn(5, 8), torch.randint(0, 13, (5,))
    loss = lm_head_cross_entropy(hidden, wrapper, labels)
    got = _grads(loss, [copy.weight, copy.bias])
    ref = F.cross_entropy(wrapper(hidden), labels)
    assert torch.allclose(loss, ref, rtol=1e-5)
    for g, w in zip(got, _grads(ref, [copy.weight, copy.bias])):
        assert rel_err(g, w) <= 1e-5


def test_plain_linear_head_and_refusals():
    linear = nn.Linear(8, 13, bias=False)
    hidden, labels = _leaf(torch.randn(4, 8)), torch.randint(0, 13, (4,))
    loss = lm_head_cross_entropy(hidden, linear, labels, reduction="sum")
    assert torch.allclose(loss, F.cross_entropy(linear(hidden), labels, reduction="sum"), rtol=1e-5)
    with pytest.raises(TypeError, match="lm_head.*Conv1d.*supported"):
        lm_head_cross_entropy(hidden, nn.Conv1d(8, 13, 1), labels)
    dora = peft.get_peft_model(_Holder(nn.Linear(8, 13)), peft.LoraConfig(r=2, target_modules=["lm_head"],
                                                                        use_dora=True)).base_model.model.lm_head
    with pytest.raises(ValueError, match="variant"):
        lm_head_cross_entropy(hidden, dora, labels)


# ------------------------------------------------------------------------------------------------
# KL distillation, sequence log-probs, DPO

@pytest.mark.parametrize("seed", range(6))
def test_kl_div_matches_fp64_reference(seed):
    rnd = random.Random(seed)
    dtype = DTYPES[seed % 3]
    T, Hs, Ht, V = rnd.randint(1, 40), 16, 24, rnd.choice([7, 101])
    direction, reduction = rnd.choice(["forward", "reverse"]), rnd.choice(["mean", "sum", "none"])
    opts = dict(temperature=rnd.choice([1.0, 2.0]), direction=direction, reduction=reduction)
    if rnd.random() < 0.6:
        labels = torch.randint(0, V, (T,))
        labels[::3] = -100
        opts["labels"] = labels
    if reduction == "mean" and rnd.random() < 0.4:
        opts["num_items"] = 11
    hs, ws = _leaf(torch.randn(T, Hs).to(dtype)), _leaf((torch.randn(V, Hs) * 0.5).to(dtype))
    ht, wt = torch.randn(T, Ht).to(dtype), (torch.randn(V, Ht) * 0.5).to(dtype)
    loss = linear_kl_div(hs, ws, ht, wt, backend="torch", chunk_size=rnd.choice([3, 16]), **opts)
    refs = [_leaf(hs, torch.float64), _leaf(ws, torch.float64)]
    loss_ref = linear_kl_div_reference(refs[0], refs[1], ht.double(), wt.double(), **opts)
    assert rel_err(loss, loss_ref) <= TOL[dtype] * 2
    go = torch.rand(loss.shape, dtype=torch.float64) + 0.5
    _assert_grads(_grads(loss, [hs, ws], go.float()), _grads(loss_ref, refs, go), dtype, ["student_hidden",
                                                                                          "student_weight"])


@interpreter_only
def test_kl_div_triton_backend():
    hs, ws = _leaf(torch.randn(2, 9, 16)), _leaf(torch.randn(101, 16) * 0.5)
    ht, wt = torch.randn(2, 9, 8), torch.randn(101, 8)
    for direction in ("forward", "reverse"):
        loss = linear_kl_div(hs, ws, ht, wt, temperature=1.5, direction=direction, backend="triton", chunk_size=8)
        refs = [_leaf(hs, torch.float64), _leaf(ws, torch.float64)]
        ref = linear_kl_div_reference(*refs, ht.double(), wt.double(), temperature=1.5, direction=direction)
        assert rel_err(loss, ref) <= 1e-5
        _assert_grads(_grads(loss, [hs, ws]), _grads(ref, refs), torch.float32, ["student_hidden", "student_weight"])


@interpreter_only
@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_kl_div_triton_keeps_its_precision_at_huge_logits(direction):
    """Logits of ±1e4 (the two log-sum-exps ~1e4 each): the row kernel sums log-prob differences relative to the
    running maxima instead of subtracting two ~1e4 terms (that lost ~3e-5 absolute on a KL of 1.3)."""
    g = torch.Generator().manual_seed(0)
    V = 100
    ws = torch.randint(-3, 3, (V, 1), generator=g).float() * 1e4 / 3
    wt = ws + torch.randint(-1, 2, (V, 1), generator=g).float() * 100
    h = torch.ones(6, 1)
    loss = linear_kl_div(h, ws, h, wt, temperature=2.0, direction=direction, backend="triton")
    ref = linear_kl_div_reference(h.double(), ws.double(), h.double(), wt.double(), temperature=2.0,
                                  direction=direction)
    assert abs(loss.item() - ref.item()) <= 4 * torch.finfo(torch.float32).eps * abs(ref.item())


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=interpreter_only)])
def test_cross_entropy_with_a_masked_leading_vocab_block(backend):
    """A -inf bias over the first 70 vocabulary entries (more than one of the kernel's blocks, 64 under the
    interpreter): the online log-sum-exp started from exp(-inf - -inf) = NaN there; torch gives a finite loss."""
    g = torch.Generator().manual_seed(0)
    V = 200
    h, w = torch.randn(5, 16, generator=g), torch.randn(V, 16, generator=g)
    bias = torch.zeros(V)
    bias[:70] = float("-inf")
    labels = torch.tensor([100, 150, 199, -100, 70])
    hh, ww = _leaf(h), _leaf(w)
    loss = linear_cross_entropy(hh, ww, labels, bias=bias, backend=backend)
    got = _grads(loss, (hh, ww))
    h64, w64 = _leaf(h, torch.float64), _leaf(w, torch.float64)
    ref = F.cross_entropy(h64 @ w64.t() + bias.double(), labels)
    want = _grads(ref, (h64, w64))
    assert torch.isfinite(loss) and abs(loss.item() - ref.item()) <= 1e-5 * ref.item()
    for name, a, b in zip("hw", got, want):
        assert torch.isfinite(a).all() and rel_err(a, b) <= TOL[torch.float32], f"d{name}"


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=interpreter_only)])
@pytest.mark.parametrize("size", [1e3, 1e4, 3e4])
def test_cross_entropy_keeps_fp32_precision_at_huge_logits(backend, size):
    """Near-tied top logits of ±size: log-probs as (z - max) - log Σ exp(z - max), as log_softmax makes them.
    z - lse rounded at the ulp of |lse| (1e-3 at 1e4): a loss 4.5e-4 off at 1e4, gradients 2.5e-4 off."""
    g = torch.Generator().manual_seed(1)
    V, T = 97, 8
    w = (torch.randint(-2, 2, (V, 1), generator=g).float() * size / 2 + torch.rand(V, 1, generator=g))
    h = torch.ones(T, 1)
    labels = w[:, 0].topk(T).indices  # each row's label among the top logits (loss ~1)
    hh, ww = _leaf(h), _leaf(w)
    loss = linear_cross_entropy(hh, ww, labels, reduction="sum", backend=backend)
    (dw,) = _grads(loss, (ww,))
    w64 = _leaf(w, torch.float64)
    ref = F.cross_entropy(h.double() @ w64.t(), labels, reduction="sum")
    (dw64,) = _grads(ref, (w64,))
    assert abs(loss.item() - ref.item()) <= 1e-6 * max(ref.item(), 1.0), (loss.item(), ref.item())
    assert rel_err(dw, dw64) <= 1e-6


@interpreter_only
@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_kl_div_triton_gradient_keeps_its_precision_at_huge_logits(direction):
    """The KL kernel's gradient, p = exp((s - max) - log d) rather than exp(s - lse): ~1e-4 relative at 1e4."""
    g = torch.Generator().manual_seed(0)
    V = 100
    ws = torch.randint(-3, 3, (V, 1), generator=g).float() * 1e4 / 3 + torch.rand(V, 1, generator=g)
    wt = ws + torch.randint(-1, 2, (V, 1), generator=g).float() * 2
    h = torch.ones(6, 1)
    s = _leaf(ws)
    (got,) = _grads(linear_kl_div(h, s, h, wt, direction=direction, backend="triton"), (s,))
    s64 = _leaf(ws, torch.float64)
    (want,) = _grads(linear_kl_div_reference(h.double(), s64, h.double(), wt.double(), direction=direction), (s64,))
    assert rel_err(got, want) <= 1e-5


def test_fp64_losses_keep_fp64_gradients_or_refuse_triton():
    """fp64 on the torch backend: dW, db accumulated in fp64 (they were fp32: 3.5e-8 off); backend="triton", whose
    kernels compute in fp32, refuses fp64 (it accepted it and gave fp32 accuracy)."""
    g = torch.Generator().manual_seed(0)
    h, w, b = (torch.randn(*s, generator=g, dtype=torch.float64) for s in ((64, 8), (30, 8), (30,)))
    labels = torch.randint(0, 30, (64,), generator=g)
    hh, ww, bb = _leaf(h), _leaf(w), _leaf(b)
    got = _grads(linear_cross_entropy(hh, ww, labels, bias=bb, reduction="sum", backend="torch"), (hh, ww, bb))
    hr, wr, br = _leaf(h), _leaf(w), _leaf(b)
    want = _grads(F.cross_entropy(hr @ wr.t() + br, labels, reduction="sum"), (hr, wr, br))
    for name, a, r in zip(("hidden", "weight", "bias"), got, want):
        assert a.dtype == torch.float64 and rel_err(a, r) <= 1e-12, name
    if HAS_TRITON:
        with pytest.raises(ValueError, match="`hidden` is torch.float64"):
            linear_cross_entropy(h, w, labels, backend="triton")
        with pytest.raises(ValueError, match="`student_hidden` is torch.float64"):
            linear_kl_div(h, w, h, w, backend="triton")


def test_sequence_logprobs_and_dpo_match_reference():
    B, S, H, V = 3, 7, 16, 41
    weight, bias = _leaf(torch.randn(V, H) * 0.5), _leaf(torch.randn(V))
    chosen, rejected = _leaf(torch.randn(B, S, H)), _leaf(torch.randn(B, S + 2, H))
    lab_c, lab_r = torch.randint(0, V, (B, S)), torch.randint(0, V, (B, S + 2))
    lab_c[:, :2], lab_r[:, :3] = -100, -100  # prompt tokens
    logps = linear_sequence_logprobs(chosen, weight, lab_c, bias=bias, backend="torch", chunk_size=5)
    refs = [_leaf(t, torch.float64) for t in (chosen, weight, bias)]
    logps_ref = linear_sequence_logprobs_reference(refs[0], refs[1], lab_c, bias=refs[2])
    assert logps.shape == (B,) and rel_err(logps, logps_ref) <= 1e-5
    go = torch.randn(B, dtype=torch.float64)
    _assert_grads(_grads(logps, [chosen, weight, bias], go.float()), _grads(logps_ref, refs, go), torch.float32,
                  ["hidden", "weight", "bias"])
    with torch.no_grad():
        ref_c = linear_sequence_logprobs(chosen, weight * 0.9, lab_c) + 0.1
        ref_r = linear_sequence_logprobs(rejected, weight * 0.9, lab_r) - 0.2
    out = linear_dpo_loss(chosen, rejected, weight, lab_c, lab_r, ref_chosen_logps=ref_c, ref_rejected_logps=ref_r,
                          beta=0.5, bias=bias)
    leaves = [_leaf(t, torch.float64) for t in (chosen, rejected, weight, bias)]
    out_ref = linear_dpo_loss_reference(*leaves[:3], lab_c, lab_r, ref_chosen_logps=ref_c.double(),
                                        ref_rejected_logps=ref_r.double(), beta=0.5, bias=leaves[3])
    for got, want in zip(out, out_ref):
        assert rel_err(got, want) <= 1e-5
    _assert_grads(_grads(out[0], [chosen, rejected, weight, bias]), _grads(out_ref[0], leaves), torch.float32,
                  ["chosen", "rejected", "weight", "bias"])


# ------------------------------------------------------------------------------------------------
# bad input

@pytest.mark.parametrize("kwargs, match", [
    (dict(labels=torch.tensor([0, 13, 1])), "labels.*13.*outside"),
    (dict(labels=torch.tensor([0, 1])), "labels.*shape"),
    (dict(labels=torch.tensor([0.0, 1, 2])), "labels.*int64"),
    (dict(weight=torch.randn(13, 5)), "hidden.*8 features.*weight"),
    (dict(weight=torch.randn(13, 8, dtype=torch.float64)), "hidden.*float32.*weight.*float64"),
    (dict(bias=torch.randn(12)), "bias.*13"),
    (dict(reduction="avg"), "reduction"),
    (dict(reduction="sum", num_items=4), "num_items.*mean"),
    (dict(num_items=0), "num_items.*positive"),
    (dict(num_items=torch.tensor(0)), "num_items.*positive.*holding 0"),
    (dict(num_items=torch.tensor(-5.0)), "num_items.*positive.*holding -5"),
    (dict(num_items=torch.tensor(float("nan"))), "num_items.*positive.*holding nan"),
    (dict(softcap=-1.0), "softcap"),
    (dict(label_smoothing=1.5), "label_smoothing"),
    (dict(backend="cuda"), "backend"),
    (dict(chunk_size=0), "chunk_size"),
])
def test_bad_input_names_the_argument(kwargs, match):
    args = dict(hidden=torch.randn(3, 8), weight=torch.randn(13, 8), labels=torch.tensor([0, 1, 2]))
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        linear_cross_entropy(args.pop("hidden"), args.pop("weight"), args.pop("labels"), **args)


def test_bad_kl_and_dpo_input():
    h, w = torch.randn(3, 8), torch.randn(13, 8)
    with pytest.raises(ValueError, match="direction"):
        linear_kl_div(h, w, h, w, direction="both")
    with pytest.raises(ValueError, match="teacher_weight.*14.*vocabulary"):
        linear_kl_div(h, w, h, torch.randn(14, 8))
    with pytest.raises(ValueError, match="temperature"):
        linear_kl_div(h, w, h, w, temperature=0)
    hc = torch.randn(2, 3, 8)
    lab = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="ref_chosen_logps.*\\(2,\\)"):
        linear_dpo_loss(hc, hc, w, lab, lab, ref_chosen_logps=torch.zeros(3), ref_rejected_logps=torch.zeros(2))
    # (B, H) rows with (B,) labels would sum over the batch and broadcast one log-prob to every pair
    with pytest.raises(ValueError, match=r"policy_chosen_hidden` must be \(B, S, H\), got shape \(2, 8\)"):
        linear_dpo_loss(hc[:, 0], hc[:, 0], w, lab[:, 0], lab[:, 0], ref_chosen_logps=torch.zeros(2),
                        ref_rejected_logps=torch.zeros(2))
    zeros = dict(ref_chosen_logps=torch.zeros(2), ref_rejected_logps=torch.zeros(2))
    for name, bad in (("chosen_labels", 0), ("rejected_labels", 1)):  # each named, not the concatenated `labels`
        labels = [lab.clone(), lab.clone()]
        labels[bad][1, 2] = 13
        with pytest.raises(ValueError, match=f"`{name}` holds 13, outside \\[0, 13\\)"):
            linear_dpo_loss(hc, hc, w, *labels, **zeros)


def test_backward_twice_is_refused():
    hidden = _leaf(torch.randn(3, 8))
    loss = linear_cross_entropy(hidden, torch.randn(13, 8), torch.tensor([0, 1, 2]))
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
def test_default_chunk_budget_env(monkeypatch):
    monkeypatch.setenv("FASTFT_LOSS_CHUNK_MIB", "1")
    assert chunked_logits.chunk_budget_bytes(torch.device("cpu")) == 2**20
    for bad in ("zero", "inf", "nan", "-1"):  # inf gave an OverflowError from int()
        monkeypatch.setenv("FASTFT_LOSS_CHUNK_MIB", bad)
        with pytest.raises(ValueError, match="FASTFT_LOSS_CHUNK_MIB must be a positive, finite number"):
            chunked_logits.chunk_budget_bytes(torch.device("cpu"))


@pytest.mark.parametrize("backend", ["torch"] + (["triton"] if HAS_TRITON else []))
def test_fp16_weight_and_lora_gradients_do_not_overflow(backend, monkeypatch):
    """fp16 keeps dlogits unscaled until backward (the 1/N would flush them): the token sums dW = dlᵀ·h, dB, dA
    must not pass 65504 on their way to the fp32 accumulators. 512 tokens of hidden ≈ 160 all labelled 0: the
    unscaled chunk product is ~8e4 (checked below) while the mean-loss gradient is ~150."""
    monkeypatch.setenv("FASTFT_LORA_BACKEND", "torch")
    g = torch.Generator().manual_seed(0)
    T, H, V = 512, 8, 16
    h16 = (160.0 + 0.4 * torch.randn(T, H, generator=g)).half()
    labels = torch.zeros(T, dtype=torch.long)
    head = _lora_head("fastft", H=H, V=V, bias=False).half()
    head.get_base_layer().weight.requires_grad_(True)
    W, A, B = head.get_base_layer().weight, head.lora_A["default"].weight, head.lora_B["default"].weight
    with torch.no_grad():
        W.normal_(std=0.01, generator=g)
    hidden = _leaf(h16)
    got = _grads(lm_head_cross_entropy(hidden, head, labels, backend=backend), [hidden, W, A, B])
    refs = [t.detach().double().requires_grad_(True) for t in (h16, W, A, B)]
    logits = refs[0] @ (refs[1] + head.scaling["default"] * refs[3] @ refs[2]).t()
    want = _grads(F.cross_entropy(logits, labels), refs)
    unscaled = (logits.softmax(-1) - F.one_hot(labels, V)).t() @ refs[0]  # dW of the summed loss
    assert unscaled.abs().max() > 65504  # the case the test is about: an fp16 product would overflow
    for name, a, b in zip(["hidden", "weight", "lora_A", "lora_B"], got, want):
        assert rel_err(a, b) <= 5e-3, name


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=interpreter_only)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_grad_output_scales_the_gradients_in_fp32(backend, dtype, monkeypatch):
    """The training loop backprops loss·(world/count): a grad_output rounded to bf16 before it scaled the saved
    gradients made grad(loss/3) = 0.334·grad(loss) (a bf16 1/3). Scalar losses, per-row losses (the frozen-head dh
    the DPO log-probs take), and the chunked fp32 temporary (a small chunk here) all scale by the exact factor."""
    monkeypatch.setattr(chunked_logits, "_FP32_TEMP", 64)
    torch.manual_seed(0)
    h, W = torch.randn(40, 32).to(dtype), (torch.randn(100, 32) * 0.2).to(dtype)
    y = torch.randint(0, 100, (40,))
    head = nn.Linear(32, 100, bias=False).to(dtype).requires_grad_(False)
    head.weight.copy_(W)
    for loss_of, inputs in ((lambda hh, ww: linear_cross_entropy(hh, ww, y, reduction="sum", backend=backend),
                             (_leaf(h), _leaf(W))),
                            (lambda hh: lm_head_cross_entropy(hh, head, y, reduction="none", backend=backend).sum(),
                             (_leaf(h),))):
        whole = _grads(loss_of(*inputs), inputs)
        third = _grads(loss_of(*inputs) / 3, inputs)
        for g1, g3 in zip(whole, third):
            ratio = (g3.double().norm() / g1.double().norm()).item()
            # 3·(1/3 rounded): 1.002 in bf16, 0.99976 in fp16; the rounding of the gradients' own entries ~1e-4, 1e-5
            assert abs(ratio * 3 - 1) < (1e-3 if dtype == torch.bfloat16 else 1e-4), ratio


def test_a_unit_gradient_is_read_only_where_skipping_pays():
    """loss.backward() (g == 1) lets backward skip a pass over the gradients, but knowing it reads g: on a GPU a
    sync, paid at every fastft train micro-batch (its g is 1/count) to skip at most a pass over dh. Read on the CPU
    (free) and where a weight gradient would be scaled; a meta tensor stands in for a device one (a read raises)."""
    from fastft.ops.chunked_logits import _unit_gradient

    on_device = torch.ones(1, device="meta")
    assert _unit_gradient(on_device, weight_grad=False) is False  # no read
    with pytest.raises((NotImplementedError, RuntimeError)):
        _unit_gradient(on_device, weight_grad=True)  # read: worth it for a V x H weight gradient
    assert _unit_gradient(torch.ones(1), weight_grad=False) is True
    assert _unit_gradient(torch.full((1,), 0.5), weight_grad=True) is False
