"""The fused linear losses under torch.compile (fullgraph: no graph break) on the Triton backend, as the custom ops
of fastft.ops.linear_losses_compiled, giving what eager gives (the same kernels: exactly), forward and backward,
for every reduction, both chunk modes (gradients made in the forward / the chunks recomputed in backward, and
its dh-only shortcut) and every lm_head kind; and torch.library.opcheck on each custom op. Triton through the
interpreter on CPU, tiny sizes."""
import peft
import pytest
import torch
from torch import nn
from torch._dynamo.backends.debugging import aot_eager

import fastft
from fastft.modules.nf4_linear import NF4Linear
from fastft.ops.linear_losses import (linear_cross_entropy, linear_distill_loss, linear_dpo_loss, linear_kl_div,
                                      linear_sequence_logprobs, lm_head_cross_entropy)
from fastft.ops.compiled_args import nf4_args, seed_tensor
from fastft.ops.linear_losses_compiled import linear_loss_op, row_losses_backward_op, row_losses_op
from tests.compile_utils import assert_compiles_like_eager, leaves, run_with_grads
from tests.utils import interpreter_only


H, V = 24, 77  # ragged against the row kernel's 64-wide vocab blocks
SCALAR, ROWS = ("linear_loss",), ("linear_row_losses",)
# a LoRA head with dropout: the ops' cudagraph_unsafe twins (fastft.ops.compiled_args.seeded_ops)
SCALAR_DROPOUT, ROWS_DROPOUT = ("linear_loss_dropout",), ("linear_row_losses_dropout",)


def _t(*shape, dtype=torch.float32, grad=True, scale=1.0):
    return (torch.randn(*shape, dtype=dtype) * scale).requires_grad_(grad)


def _labels(*shape, vocab=V):
    y = torch.randint(0, vocab, shape)
    y.view(-1)[1] = -100
    return y


# ----------------------------------------------------------------------------------------------
# the ops on tensors: every reduction, both chunk modes, the options that change what flows

@interpreter_only
@pytest.mark.parametrize("reduction, weight_grad, dtype", [
    ("mean", True, torch.float32),    # gradients made in the forward
    ("sum", True, torch.float16),     # ... fp16: left unscaled until backward (post-scale)
    ("none", True, torch.float32),    # chunks recomputed in backward
    ("none", False, torch.float32),   # dh only: made in the forward, rows scaled in backward
])
def test_linear_cross_entropy_compiles(reduction, weight_grad, dtype):
    torch.manual_seed(0)
    h, w, b = _t(2, 7, H, dtype=dtype), _t(V, H, dtype=dtype, grad=weight_grad, scale=0.3), _t(V, dtype=dtype,
                                                                                               grad=weight_grad)
    y = _labels(2, 7)
    ops = ROWS if reduction == "none" else SCALAR
    assert_compiles_like_eager(
        lambda h, w, b: linear_cross_entropy(h, w, y, bias=b, reduction=reduction, label_smoothing=0.1, softcap=3.0,
                                             backend="triton", chunk_size=5), h, w, b, ops=ops)


def test_torch_backend_compiles_once_for_every_token_count():
    """The torch backend (the CPU's) traced its chunk loop, which specialised the graph on the token count: a
    recompile per packed batch length until dynamo's limit sent `fastft train --compile` back to eager. It takes
    the custom op as the Triton backend does: one dynamic graph, eager's numbers."""
    torch.manual_seed(2)
    fn = lambda h, w, y: linear_cross_entropy(h, w, y, reduction="sum", backend="torch")  # noqa: E731
    w = _t(V, H, scale=0.3)
    torch._dynamo.reset()
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True, dynamic=True)
    compiled(_t(9, H), w, _labels(9))
    with torch._dynamo.config.patch(error_on_recompile=True):
        for tokens in (5, 13, 21):
            h, y = _t(tokens, H), _labels(tokens)
            got, want = run_with_grads(compiled, [h, w, y]), run_with_grads(fn, [h, w, y])
            for g, r in zip(got[0] + got[1], want[0] + want[1]):
                torch.testing.assert_close(g, r, atol=0, rtol=0)


@interpreter_only
def test_linear_cross_entropy_num_items_and_dynamic_shapes():
    torch.manual_seed(1)
    n = torch.tensor(9.0)
    fn = lambda h, w, y: linear_cross_entropy(h, w, y, num_items=n, backend="triton", chunk_size=4)  # noqa: E731
    h, w = _t(3, 5, H), _t(V, H, scale=0.3)
    assert_compiles_like_eager(fn, h, w, _labels(3, 5), ops=SCALAR, dynamic=True)
    # another token count and vocab: the same graph (no recompile), still eager's numbers
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True, dynamic=True)
    compiled(h, w, _labels(3, 5))
    with torch._dynamo.config.patch(error_on_recompile=True):
        h2, w2, y2 = _t(2, 11, H), _t(V + 6, H, scale=0.3), _labels(2, 11, vocab=V + 6)
        torch.testing.assert_close(compiled(h2, w2, y2), fn(h2, w2, y2), atol=0, rtol=0)


@interpreter_only
def test_num_items_as_a_python_int_compiles_once_and_bad_tensors_are_refused():
    """An int num_items gave a graph per value (torch.as_tensor guarded on it) until the recompile limit; a tensor
    of 0, -3 or NaN passed while traced (eager refuses them): inf, a flipped loss or NaN."""
    torch.manual_seed(1)
    h, w, y = _t(2, 5, H), _t(V, H, scale=0.3), _labels(2, 5)
    fn = lambda h, n: linear_cross_entropy(h, w, y, num_items=n, backend="triton")  # noqa: E731
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    compiled(h, 3)
    compiled(h, 4)  # the second value makes it dynamic
    with torch._dynamo.config.patch(error_on_recompile=True):
        for n in (5, 9, 12):
            torch.testing.assert_close(compiled(h, n), fn(h, n), atol=0, rtol=0)
    for bad in (0.0, -3.0, float("nan")):
        with pytest.raises(ValueError, match="`num_items` must be a positive number, got a tensor holding"):
            compiled(h, torch.tensor(bad))


@interpreter_only
@pytest.mark.parametrize("direction, reduction, with_labels", [("forward", "mean", True), ("reverse", "none", False)])
def test_linear_kl_div_compiles(direction, reduction, with_labels):
    torch.manual_seed(2)
    h, w = _t(2, 6, H), _t(V, H, scale=0.3)
    th, tw = _t(2, 6, 16, grad=False), _t(V, 16, scale=0.3, grad=False)  # the teacher gets no gradient
    y = _labels(2, 6) if with_labels else None
    assert_compiles_like_eager(
        lambda h, w: linear_kl_div(h, w, th, tw, temperature=2.0, direction=direction, labels=y, reduction=reduction,
                                   backend="triton", chunk_size=5), h, w, ops=ROWS if reduction == "none" else SCALAR)


@interpreter_only
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_linear_distill_loss_compiles(reduction):
    """Every term in one op: the weights cross the custom op as a float list."""
    torch.manual_seed(3)
    h, w = _t(2, 6, H), _t(V, H, scale=0.3)
    th, tw = _t(2, 6, 16, grad=False), _t(V, 16, scale=0.3, grad=False)
    y = _labels(2, 6)
    assert_compiles_like_eager(
        lambda h, w: linear_distill_loss(h, w, th, tw, y, kl_weight=0.5, reverse_kl_weight=0.3, ce_weight=0.2,
                                         temperature=2.0, reduction=reduction, backend="triton", chunk_size=5),
        h, w, ops=ROWS if reduction == "none" else SCALAR)


@interpreter_only
def test_linear_sequence_logprobs_compiles():
    torch.manual_seed(4)
    h, w, b = _t(3, 5, H), _t(V, H, scale=0.3), _t(V)
    y = _labels(3, 5)
    assert_compiles_like_eager(lambda h, w, b: linear_sequence_logprobs(h, w, y, bias=b, softcap=4.0, backend="triton",
                                                                        chunk_size=4), h, w, b, ops=ROWS)


@interpreter_only
def test_linear_dpo_loss_compiles():
    torch.manual_seed(5)
    hc, hr, w = _t(2, 5, H), _t(2, 6, H), _t(V, H, scale=0.3)
    yc, yr = _labels(2, 5), _labels(2, 6)
    ref_c, ref_r = torch.randn(2) - 20, torch.randn(2) - 20

    def fn(hc, hr, w):
        return linear_dpo_loss(hc, hr, w, yc, yr, ref_chosen_logps=ref_c, ref_rejected_logps=ref_r, beta=0.3,
                               backend="triton")
    assert_compiles_like_eager(fn, hc, hr, w, ops=ROWS)


@interpreter_only
def test_reference_pass_under_no_grad_compiles():
    torch.manual_seed(6)
    h, w, y = _t(2, 5, H), _t(V, H, scale=0.3), _labels(2, 5)

    def fn(h, w):
        with torch.no_grad():
            return linear_sequence_logprobs(h, w, y, backend="triton")
    assert_compiles_like_eager(fn, h, w, ops=ROWS)


@interpreter_only
def test_labels_are_still_checked_under_compile():
    h, w = _t(2, 3, H), _t(V, H)
    y = torch.tensor([[1, 2, 3], [4, V, 5]])
    compiled = torch.compile(lambda h, w: linear_cross_entropy(h, w, y, backend="triton"), backend="aot_eager",
                             fullgraph=True)
    torch._dynamo.reset()
    with pytest.raises(ValueError, match=f"`labels` holds {V}, outside"):
        compiled(h, w)


# ----------------------------------------------------------------------------------------------
# lm_head_cross_entropy: every head kind (its parameters' gradients compared too)

class _Holder(nn.Module):
    def __init__(self, lm_head, **others):
        super().__init__()
        self.lm_head = lm_head
        for name, module in others.items():
            self.add_module(name, module)


def _perturbed(module):
    """LoRA B starts at zero: give every float parameter values, so every gradient path carries something."""
    with torch.no_grad():
        for p in module.parameters():
            if p.dtype.is_floating_point and not hasattr(p, "packed"):
                p.add_(torch.randn_like(p) * 0.2)
    return module


def _head(kind, dropout=0.0):
    base = NF4Linear.from_linear(nn.Linear(H, V)) if kind in ("nf4", "qlora") else nn.Linear(H, V)
    if kind == "nf4_unnested":
        base = NF4Linear.from_linear(nn.Linear(H, V), blocksize=32, double_quant=False)
    if kind in ("linear", "nf4", "nf4_unnested"):
        return _perturbed(base)
    if kind == "modules_to_save":
        model = peft.get_peft_model(_Holder(base, q=nn.Linear(2, 2)),
                                    peft.LoraConfig(r=1, target_modules=["q"], modules_to_save=["lm_head"]))
        return _perturbed(model.base_model.model.lm_head)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["lm_head"], lora_dropout=dropout)
    model = (fastft.get_peft_model if kind in ("fastft_lora", "qlora") else peft.get_peft_model)(_Holder(base), config)
    if kind == "peft_lora_two":
        model.add_adapter("second", peft.LoraConfig(r=2, lora_alpha=3, target_modules=["lm_head"],
                                                    lora_dropout=dropout))
        model.base_model.model.lm_head.set_adapter(["default", "second"])
    return _perturbed(model.base_model.model.lm_head)


def _run(fn, module, x, seed):
    """fn(x)'s outputs and the gradients of x and of the module's trainable parameters (LoRA dropout drawn from
    torch's generator, seeded)."""
    params = [x] + [p for p in module.parameters() if p.requires_grad]
    torch.manual_seed(seed)
    out = fn(x)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out.device)
    return [out.detach()] + list(torch.autograd.grad((out * g).sum(), params))


def _assert_head_compiles_like_eager(fn, module, x, ops, seed=0):
    graphs = []

    def recording(gm, example_inputs):  # with the subgraphs of higher-order ops (a checkpointed region's body)
        graphs.extend(m.code for m in gm.modules() if isinstance(m, torch.fx.GraphModule))
        return aot_eager(gm, example_inputs)

    torch._dynamo.reset()
    want = _run(fn, module, x, seed)
    got = _run(torch.compile(fn, backend=recording, fullgraph=True), module, x, seed)
    code = "\n".join(graphs)
    for op in ops:
        assert f"torch.ops.fastft.{op}." in code, f"fastft::{op} is not in the traced graph:\n{code}"
    assert len(got) == len(want) == 2 + sum(p.requires_grad for p in module.parameters())
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=0, rtol=0)


@interpreter_only
@pytest.mark.parametrize("kind, reduction", [
    ("linear", "mean"), ("modules_to_save", "sum"), ("nf4", "mean"), ("nf4_unnested", "none"),
    ("peft_lora_two", "none"), ("fastft_lora", "sum"), ("qlora", "none")])  # peft_lora: the dropout test below
def test_lm_head_cross_entropy_compiles(kind, reduction, monkeypatch):
    if "nf4" not in kind and kind != "qlora":  # an NF4 head in one chunk: each vocab block costs ~20 ms here
        monkeypatch.setenv("FASTFT_LOSS_CHUNK_MIB", str(4 * V * 4 / 2**20))  # 4 rows a chunk: 3 chunks
    torch.manual_seed(7)
    head = _head(kind)
    x, y = _t(2, 5, H), _labels(2, 5)
    _assert_head_compiles_like_eager(
        lambda x: lm_head_cross_entropy(x, head, y, reduction=reduction, label_smoothing=0.05, backend="triton"),
        head, x, ROWS if reduction == "none" else SCALAR)


@interpreter_only
def test_lora_head_dropout_is_drawn_per_call_under_compile(monkeypatch):
    """A peft LoRA head with dropout in training mode. The dropout seed is drawn at run time by fastft::draw_seed
    (in its body, from torch's generator, as in eager), not baked into the graph: the same seed gives eager's masks
    exactly, two calls give two masks."""
    monkeypatch.setenv("FASTFT_LOSS_CHUNK_MIB", str(4 * V * 4 / 2**20))
    torch.manual_seed(8)
    head = _head("peft_lora", dropout=0.4).train()
    x, y = _t(2, 5, H), _labels(2, 5)
    fn = lambda x: lm_head_cross_entropy(x, head, y, reduction="none", backend="triton")  # noqa: E731
    # one seed, forward and backward
    _assert_head_compiles_like_eager(fn, head, x, ROWS_DROPOUT + ("draw_seed",), seed=3)
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    assert not torch.equal(compiled(x), compiled(x))


@interpreter_only
def test_lora_head_dropout_on_the_same_hidden_states_twice_draws_two_masks(monkeypatch):
    """The head's loss twice on the same hidden states in one graph (R-Drop): two fastft::draw_seed calls that CSE
    merged into one gave the same mask twice; each call now draws its own, as eager does."""
    monkeypatch.setenv("FASTFT_LOSS_CHUNK_MIB", str(4 * V * 4 / 2**20))
    torch.manual_seed(9)
    head = _head("peft_lora", dropout=0.4).train()
    x, y = _t(2, 5, H), _labels(2, 5)

    def twice(x):
        one = lm_head_cross_entropy(x, head, y, reduction="none", backend="triton")
        return torch.stack([one, lm_head_cross_entropy(x, head, y, reduction="none", backend="triton")])

    _assert_head_compiles_like_eager(twice, head, x, ROWS_DROPOUT + ("draw_seed",), seed=4)
    torch.manual_seed(4)
    losses = torch.compile(twice, backend="aot_eager", fullgraph=True)(x)
    assert not torch.equal(losses[0], losses[1])


@interpreter_only
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_lora_head_dropout_under_activation_checkpointing(reduction, monkeypatch):
    """An lm_head LoRA with dropout inside a checkpointed region, which backward recomputes: the loss ops take the
    seed as an input (drawn by fastft::draw_seed, which the partitioner saves or replays), so the recomputation
    regenerates the forward's mask and the compiled gradients are the checkpointed eager run's, exactly. (With the
    seed drawn in the loss op's body, the recomputation drew another mask.)"""
    monkeypatch.setenv("FASTFT_LOSS_CHUNK_MIB", str(4 * V * 4 / 2**20))
    torch.manual_seed(12)
    head = _head("peft_lora", dropout=0.4).train()
    x, y = _t(2, 5, H), _labels(2, 5)

    def region(x):  # work before the head, so the recomputed region has more than the loss op
        return lm_head_cross_entropy(torch.tanh(x) * 1.5, head, y, reduction=reduction, backend="triton")

    fn = lambda x: torch.utils.checkpoint.checkpoint(region, x, use_reentrant=False)  # noqa: E731
    _assert_head_compiles_like_eager(fn, head, x, (ROWS_DROPOUT if reduction == "none" else SCALAR_DROPOUT)
                                     + ("draw_seed",), seed=5)


# ----------------------------------------------------------------------------------------------
# opcheck: schema, fake kernels against the real ones, autograd registration, AOT dispatch

def _options(kind="ce", vocab=V, scaling=1.0, nf4_ints=(), chunk_size=3, weights=()):
    """The Python options (op .. weights); the tensor arguments before them end with the seed."""
    return ["opcheck", kind, "triton", vocab, -100, 0.1 if kind == "ce" else 0.0, 3.0 if kind == "ce" else None,
            1.5, scaling, 0.0, list(nf4_ints), chunk_size, 4, list(weights)]


@interpreter_only
def test_opcheck_linear_loss():
    torch.manual_seed(9)
    h, w, b, y = _t(5, H), _t(V, H, scale=0.3), _t(V), _labels(5)
    A, B = _t(3, H, scale=0.3), _t(V, 3, scale=0.3)
    torch.library.opcheck(linear_loss_op, (h, w, b, A, B, [], y, None, None, torch.tensor([0.25]), None,
                                           *_options(scaling=2.0), [True, True, True, True, True]))


@interpreter_only
def test_opcheck_linear_row_losses_and_backward():
    torch.manual_seed(10)
    h, w, b, y = _t(5, H), _t(V, H, scale=0.3), _t(V), _labels(5)
    args = (h, w, b, None, None, [], y, None, None, torch.ones(1), None, *_options())
    torch.library.opcheck(row_losses_op, (*args, False))
    detached = [a.detach() if isinstance(a, torch.Tensor) else a for a in args]
    torch.library.opcheck(row_losses_backward_op, (*detached, torch.randn(5), [True, True, True, False, False]))


@interpreter_only
def test_opcheck_linear_row_losses_nf4_head_dh_only():
    torch.manual_seed(11)
    head = NF4Linear.from_linear(nn.Linear(H, V))
    parts, ints = nf4_args(head.weight)
    h, y = _t(5, H), _labels(5)
    torch.library.opcheck(row_losses_op, (h, None, head.bias.detach(), None, None, parts, y, None, None,
                                          torch.ones(1), None, *_options(nf4_ints=ints), True))


# ----------------------------------------------------------------------------------------------
# CUDA graphs (the GPU test never ran in the session that wrote it: no GPU there)

@interpreter_only
def test_lora_dropout_refuses_cuda_graph_capture(monkeypatch):
    """While a CUDA graph is captured (faked here: no GPU) a host-drawn seed would be replayed: refused, saying what
    to do."""
    import fastft.ops.compiled_args as compiled_args
    import fastft.ops.linear_losses_compiled as compiled
    monkeypatch.setattr(compiled, "capturing", lambda device: True)
    monkeypatch.setattr(compiled_args, "capturing", lambda device: True)
    h, w, y = _t(5, H), _t(V, H), _labels(5)
    A, B = _t(3, H), _t(V, 3)
    options = _options()
    options[9] = 0.2  # dropout_p
    with pytest.raises(ValueError, match=r"opcheck: dropout_p=0.2 cannot run inside a CUDA graph capture .* Use "
                                         r"dropout 0 \(e.g. lora_dropout=0.0\) or compile without CUDA graphs"):
        row_losses_op(h, w, None, A, B, [], y, None, None, torch.ones(1), seed_tensor(1), *options, False)


@interpreter_only
def test_eager_lora_head_dropout_refuses_cuda_graph_capture(monkeypatch):
    """The eager door draws the head's dropout seed on the host too: captured uncompiled (torch.cuda.graph), it
    would replay one mask every step (found by helper-180)."""
    import fastft.ops.compiled_args as compiled_args
    import fastft.ops.linear_losses as linear_losses
    head = _head("peft_lora", dropout=0.2).train()
    h, y = _t(5, H), _labels(5)
    monkeypatch.setattr(linear_losses, "capturing", lambda device: True)
    monkeypatch.setattr(compiled_args, "capturing", lambda device: True)
    with pytest.raises(ValueError, match=r"lm_head_cross_entropy: dropout_p=0.2 cannot run inside a CUDA graph"):
        lm_head_cross_entropy(h, head, y, backend="triton")


@interpreter_only
def test_lora_dropout_backward_refuses_cuda_graph_capture(monkeypatch):
    """The backward regenerates the forward's mask from the seed: captured, it would replay one mask against the
    forward's fresh ones (silently wrong gradients), so it refuses too."""
    import fastft.ops.compiled_args as compiled_args
    h, w, y = _t(5, H, grad=False), _t(V, H, grad=False), _labels(5)
    A, B = _t(3, H, grad=False), _t(V, 3, grad=False)
    options = _options()
    options[9] = 0.2  # dropout_p
    args = (h, w, None, A, B, [], y, None, None, torch.ones(1), seed_tensor(1), *options, torch.randn(5),
            [True, True, False, True, True])
    row_losses_backward_op(*args)  # not capturing: runs
    monkeypatch.setattr(compiled_args, "capturing", lambda device: True)
    with pytest.raises(ValueError, match=r"opcheck: dropout_p=0.2 cannot run inside a CUDA graph capture"):
        row_losses_backward_op(*args)


@interpreter_only
def test_double_quantized_nf4_head_under_capture_reads_no_offset(monkeypatch):
    """While a CUDA graph is captured (faked here) a double-quantized NF4 head crosses as compiled_args.nf4_args and
    has its nested scales decoded on the device (compiled_args.nf4_from_args): no host read of the offset, the same
    losses and gradients."""
    import fastft.ops.compiled_args as compiled_args
    import fastft.ops.linear_losses_compiled as compiled
    torch.manual_seed(13)
    head = NF4Linear.from_linear(nn.Linear(H, V))
    parts, ints = nf4_args(head.weight)
    assert len(parts) == 6  # double quantization: absmax2, code2, nested_offset
    h, y = _t(5, H, grad=False), _labels(5)
    args = (h, None, head.bias.detach(), None, None, parts, y, None, None, torch.full((1,), 0.2), None,
            *_options(nf4_ints=ints, chunk_size=None))
    want = linear_loss_op(*args, [True, False, False, False, False])
    monkeypatch.setattr(compiled, "capturing", lambda device: True)
    monkeypatch.setattr(compiled_args, "capturing", lambda device: True)
    monkeypatch.setattr(compiled_args, "_offset_value", lambda t: pytest.fail("read the offset to the host"))
    got = linear_loss_op(*args, [True, False, False, False, False])
    for g, w in zip(got[:2], want[:2]):  # the loss and dh
        torch.testing.assert_close(g, w, atol=0, rtol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_reduce_overhead_matches_eager_on_gpu(reduction):
    """mode="reduce-overhead" captures the custom ops in CUDA graphs: no host sync while capturing (the label check
    is skipped then), and eager's numbers (inductor may fuse the backward's scaling: bf16 tolerances)."""
    torch.manual_seed(0)
    h = torch.randn(4, 37, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(300, 64, device="cuda", dtype=torch.bfloat16) * 0.3).requires_grad_()
    y = torch.randint(0, 300, (4, 37), device="cuda")
    fn = lambda h, w: linear_cross_entropy(h, w, y, reduction=reduction, backend="triton", chunk_size=64)  # noqa: E731
    want_out, want_grads = run_with_grads(fn, leaves((h, w)))
    compiled = torch.compile(fn, mode="reduce-overhead", fullgraph=True)
    for _ in range(3):  # warm-up, record, replay
        got_out, got_grads = run_with_grads(compiled, leaves((h, w)))
    for got, want in zip(got_out + got_grads, want_out + want_grads):
        torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_lora_head_dropout_under_checkpointing_with_inductor_on_gpu(reduction):
    """Inductor's partitioner recomputes the checkpointed loss with the seed fastft::draw_seed drew in the forward
    (saved or replayed): eager's gradients (inductor may fuse the backward's scaling: a small tolerance)."""
    torch.manual_seed(0)
    head = _head("peft_lora", dropout=0.3).train().cuda()
    x = torch.randn(4, 37, H, device="cuda", requires_grad=True)
    y = torch.randint(0, V, (4, 37), device="cuda")
    fn = lambda x: torch.utils.checkpoint.checkpoint(  # noqa: E731
        lambda x: lm_head_cross_entropy(x, head, y, reduction=reduction, backend="triton"), x, use_reentrant=False)
    want = _run(fn, head, x, seed=1)
    got = _run(torch.compile(fn, fullgraph=True), head, x, seed=1)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)
