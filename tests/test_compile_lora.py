"""The LoRA-family fused ops under torch.compile (fullgraph: no graph break) as their fastft:: custom ops, giving
what eager gives, forward and backward (the same kernels run: exact): lora_linear (split and fold paths, fp32
adapters, dropout with seeds drawn in the op body), qlora_linear and nf4_linear on NF4 weights, dora_linear (dense
and NF4), peft-wrapped models compiled whole; and torch.library.opcheck on every custom op. Triton through the
interpreter on CPU (fastft.ops.compiled). The mode="reduce-overhead" (CUDA graph) tests are GPU-only."""
import copy

import pytest
import torch
from peft import LoraConfig
from torch import nn
from torch._dynamo.backends.debugging import aot_eager
from torch._dynamo.backends.common import aot_autograd
from functorch.compile import make_boxed_func

import fastft
from fastft.kernels import lora_gemm as lora_gemm_kernels
from fastft.ops.dora import (dora_linear, dora_linear_backward_op, dora_linear_op, dora_row_norm,
                             dora_row_norm_op)
from fastft.ops.compiled_args import nf4_args, seed_tensor
from fastft.ops.lora import lora_linear, lora_linear_backward_op, lora_linear_op
from fastft.ops.qlora import (nf4_linear, nf4_linear_backward_op, nf4_linear_op, qlora_linear,
                              qlora_linear_backward_op, qlora_linear_op)
from fastft.quant import quantize_nf4
from tests.compile_utils import assert_compiles_like_eager, leaves, run_with_grads
from tests.utils import interpreter_only

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
K, N, R = 64, 40, 4  # in, out, rank: one 32-block per half row; ragged against every tile
TEST_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
# The backward ops run under AOT already in the forward ops' aot_dispatch_dynamic check (through register_autograd)
BACKWARD_UTILS = TEST_UTILS[:3]


def _t(*shape, dtype=torch.float32, grad=True, scale=1.0):
    return (torch.randn(*shape, device=DEVICE, dtype=dtype) * scale).requires_grad_(grad)


def _adapters():
    """fp32 masters, as peft keeps them under mixed precision."""
    return _t(R, K, scale=0.1), _t(N, R, scale=0.1)


def _nf4(double_quant):
    return quantize_nf4(torch.randn(N, K, device=DEVICE) * 0.05, blocksize=32, double_quant=double_quant)


def _recording():
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm.code)
        return aot_eager(gm, example_inputs)
    return graphs, backend


# ----------------------------------------------------------------------------------------------
# lora_linear

@interpreter_only
@pytest.mark.parametrize("bias,dtype", [(True, torch.bfloat16), (False, torch.float32)])
@pytest.mark.parametrize("path", ["split", "fold"])
def test_lora_linear_compiles(monkeypatch, bias, dtype, path):
    monkeypatch.setenv("FASTFT_LORA_PATH", path)
    folded, real_folded = [], lora_gemm_kernels.lora_gemm_folded
    monkeypatch.setattr(lora_gemm_kernels, "lora_gemm_folded", lambda *a, **k: folded.append(1) or real_folded(*a, **k))
    x, W = _t(2, 7, K, dtype=dtype), _t(N, K, dtype=dtype, grad=False)
    b = _t(N, dtype=dtype) if bias else None
    A, B = _adapters()
    assert_compiles_like_eager(lambda x, b, A, B: lora_linear(x, W, b, A, B, 0.5, backend="triton"), x, b, A, B,
                               ops=("lora_linear",))
    assert bool(folded) == (path == "fold")  # the forced path ran, in both doors


@interpreter_only
def test_lora_linear_compiles_dynamic_with_a_weight_gradient():
    x, W, b = _t(3, 5, K), _t(N, K), _t(N)
    A, B = _adapters()
    fn = lambda x, W, b, A, B: lora_linear(x, W, b, A, B, 2.0, backend="triton")  # noqa: E731
    assert_compiles_like_eager(fn, x, W, b, A, B, ops=("lora_linear",), dynamic=True)
    # another token count runs through the same symbolic graph
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True, dynamic=True)
    compiled(x, W, b, A, B)
    x2 = _t(4, 9, K)
    with torch._dynamo.config.patch(error_on_recompile=True):
        torch.testing.assert_close(compiled(x2, W, b, A, B), fn(x2, W, b, A, B), atol=0, rtol=0)


def _dropout_case(op):
    """fn(x, b, A, B) with dropout 0.3 on `op`, and its inputs."""
    x, b = _t(3, 6, K), _t(N)
    A, B = _adapters()
    if op == "lora_linear":
        W = _t(N, K, grad=False)
        return (lambda x, b, A, B: lora_linear(x, W, b, A, B, 0.5, 0.3, backend="triton")), (x, b, A, B)
    w = _nf4(True)
    return (lambda x, b, A, B: qlora_linear(x, w, b, A, B, 0.5, 0.3, backend="triton")), (x, b, A, B)


@interpreter_only
def test_dropout_under_activation_checkpointing(captured_seeds):
    """A checkpointed region is recomputed in backward: the forward op takes its seed as an input (drawn by
    fastft::draw_seed), so the recomputation regenerates the forward's mask and the gradients are eager's."""
    fn, args = _dropout_case("lora_linear")

    def checkpointed(x, b, A, B):
        return torch.utils.checkpoint.checkpoint(lambda x: torch.relu(fn(x, b, A, B)) * 2, x, use_reentrant=False)

    torch._dynamo.reset()
    compiled = torch.compile(checkpointed, backend="aot_eager", fullgraph=True)
    run_with_grads(compiled, leaves(args))
    torch.manual_seed(7)
    want = run_with_grads(checkpointed, leaves(args))
    torch.manual_seed(7)
    got = run_with_grads(compiled, leaves(args))
    for g, w in zip(got[0] + got[1], want[0] + want[1]):
        torch.testing.assert_close(g, w, atol=0, rtol=0)


@interpreter_only
def test_every_dropout_layer_of_a_graph_draws_its_own_seed(captured_seeds):
    """Every fastft::draw_seed call of a graph is identical: AOTAutograd's CSE merged them into one, so every fused
    dropout layer of a compiled model got the first layer's seed (loss 2.5e8 against eager's 7.1e7 here). An
    ordered effect keeps each draw, in eager's order."""
    x = _t(8, K)
    (A1, B1), A2, B2 = _adapters(), _t(R, N, scale=0.1), _t(K, R, scale=0.1)
    W1, W2 = _t(N, K, grad=False), _t(K, N, grad=False)

    def two_layers(x, A1, B1, A2, B2):
        h = lora_linear(x, W1, None, A1, B1, 2.0, 0.5, backend="triton")
        return lora_linear(h, W2, None, A2, B2, 2.0, 0.5, backend="triton").square().sum()

    _assert_two_draws_like_eager(two_layers, (x, A1, B1, A2, B2), "aot_eager", captured_seeds)


def _assert_two_draws_like_eager(fn, args, backend, captured_seeds):
    """fn compiled (fullgraph) draws two dropout seeds a call, in eager's order under one torch.manual_seed, and
    gives eager's outputs and gradients exactly. Returns the compiled outputs."""
    torch._dynamo.reset()
    compiled = torch.compile(fn, backend=backend, fullgraph=True)
    run_with_grads(compiled, leaves(args))
    captured_seeds.clear()
    torch.manual_seed(7)
    want = run_with_grads(fn, leaves(args))
    torch.manual_seed(7)
    got = run_with_grads(compiled, leaves(args))
    assert len(captured_seeds) == 4 and captured_seeds[:2] == captured_seeds[2:] and len(set(captured_seeds)) == 2
    for g, w in zip(got[0] + got[1], want[0] + want[1]):
        torch.testing.assert_close(g, w, atol=0, rtol=0)
    return got[0]


@interpreter_only
@pytest.mark.parametrize("op, backend", [("lora_linear", "aot_eager"), ("lora_linear", "inductor"),
                                         ("qlora_linear", "aot_eager")])
def test_the_same_layer_twice_on_the_same_input_draws_two_masks(captured_seeds, op, backend):
    """R-Drop and SimCSE call a layer twice on one input for two dropout masks. The two fastft::draw_seed calls were
    identical nodes and CSE merged them: one seed, the same mask twice, y1 == y2 (eager: two masks). Each call
    now draws its own seed, in eager's order: outputs and gradients exactly eager's."""
    fn, args = _dropout_case(op)

    def twice(x, b, A, B):
        return fn(x, b, A, B), fn(x, b, A, B)

    y1, y2 = _assert_two_draws_like_eager(twice, args, backend, captured_seeds)
    assert not torch.equal(y1, y2)  # two masks


@interpreter_only
@pytest.mark.parametrize("op", ["lora_linear", "qlora_linear"])
def test_dropout_seeds_are_drawn_in_the_op_body(captured_seeds, op):
    """Under one torch.manual_seed the compiled op draws the seed eager draws (fastft::draw_seed's body, at run
    time: same mask, same outputs and gradients, backward regenerating it), and each compiled call draws a new one
    (the seed is not a graph constant)."""
    fn, args = _dropout_case(op)
    graphs, backend = _recording()
    torch._dynamo.reset()
    compiled = torch.compile(fn, backend=backend, fullgraph=True)
    run_with_grads(compiled, leaves(args))  # compile first: tracing draws nothing, but keep the draws in step
    # with dropout the door calls the op's cudagraph_unsafe twin (compiled_args.seeded_ops)
    assert f"torch.ops.fastft.{op}_dropout." in "\n".join(graphs) and "torch.ops.fastft.draw_seed." in "\n".join(graphs)
    captured_seeds.clear()
    torch.manual_seed(7)
    want_out, want_grads = run_with_grads(fn, leaves(args))
    torch.manual_seed(7)
    got_out, got_grads = run_with_grads(compiled, leaves(args))
    assert len(captured_seeds) == 2 and captured_seeds[0] == captured_seeds[1]
    for got, want in zip(got_out + got_grads, want_out + want_grads):
        torch.testing.assert_close(got, want, atol=0, rtol=0)
    again_out, _ = run_with_grads(compiled, leaves(args))
    assert captured_seeds[2] != captured_seeds[1]
    assert not torch.equal(again_out[0], got_out[0])  # another mask


# ----------------------------------------------------------------------------------------------
# qlora_linear and nf4_linear

@interpreter_only
@pytest.mark.parametrize("double_quant", [False, True])
def test_qlora_and_nf4_linear_compile(double_quant):
    w = _nf4(double_quant)
    x, b = _t(2, 5, K, dtype=torch.bfloat16), _t(N, dtype=torch.bfloat16)
    A, B = _adapters()
    assert_compiles_like_eager(lambda x, b, A, B: qlora_linear(x, w, b, A, B, 0.5, backend="triton"), x, b, A, B,
                               ops=("qlora_linear",))
    assert_compiles_like_eager(lambda x, b: nf4_linear(x, w, b, backend="triton"), x, b, ops=("nf4_linear",))
    assert_compiles_like_eager(lambda x: nf4_linear(x, w, backend="triton"), x, ops=("nf4_linear",))


@interpreter_only
def test_layers_with_different_nested_offsets_share_one_graph():
    """The nested offset crosses as a tensor: no recompile per layer, and each layer's own offset is used."""
    weights = [_nf4(True) for _ in range(2)]
    assert weights[0].offset != weights[1].offset
    x = _t(3, K, grad=False)
    A, B = _adapters()
    fn = lambda w, x: qlora_linear(x, w, None, A, B, 0.5, backend="triton")  # noqa: E731
    torch._dynamo.reset()
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for w in weights:
            torch.testing.assert_close(compiled(w, x), fn(w, x), atol=0, rtol=0)


@interpreter_only
def test_under_capture_nested_scales_decode_on_device_and_dropout_is_refused(monkeypatch):
    """While a CUDA graph is captured (simulated: the CPU has none) a double-quantized weight's nested offset
    cannot be read to the host: the body decodes the block scales with torch instead, to the same values; and a
    dropout seed would be replayed, so dropout is refused."""
    from fastft.ops import compiled_args

    w = _nf4(True)
    x = _t(5, K, grad=False)
    A, B = _adapters()
    want = qlora_linear(x, w, None, A, B, 0.5, backend="triton")
    monkeypatch.setattr(compiled_args, "capturing", lambda device: True)
    monkeypatch.setattr(compiled_args, "_offset_value", lambda t: pytest.fail("read the offset to the host"))
    got, _ = qlora_linear_op(x, *nf4_args(w), None, A, B, None, 0.5, 0.0)
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    with pytest.raises(ValueError, match="lora_linear: dropout_p=0.1 cannot run inside a CUDA graph capture"):
        qlora_linear_op(x, *nf4_args(w), None, A, B, seed_tensor(3), 0.5, 0.1)


@interpreter_only
@pytest.mark.parametrize("op", ["lora", "qlora"])
def test_dropout_backward_refuses_cuda_graph_capture(op, monkeypatch):
    """The backward op regenerates the forward's mask from the seed: captured, it would replay one mask against the
    forward's fresh ones (silently wrong gradients), so it refuses as the forward does."""
    from fastft.ops import compiled_args

    x, dy = _t(5, K, grad=False), _t(5, N, grad=False)
    A, B = _adapters()
    A, B = A.detach(), B.detach()
    seed = seed_tensor(3)
    if op == "lora":
        W = _t(N, K, grad=False)
        _, xs = lora_linear_op(x, W, None, A, B, seed, 0.5, 0.1)
        backward = lambda: lora_linear_backward_op(dy, x, W, None, A, B, xs, seed, 0.5, 0.1,  # noqa: E731
                                                   True, False, False, True, True)
    else:
        w = _nf4(False)
        _, xs = qlora_linear_op(x, *nf4_args(w), None, A, B, seed, 0.5, 0.1)
        backward = lambda: qlora_linear_backward_op(dy, x, *nf4_args(w), None, A, B, xs, seed, 0.5,  # noqa: E731
                                                    0.1, True, False, True, True)
    backward()  # not capturing: runs
    monkeypatch.setattr(compiled_args, "capturing", lambda device: True)
    with pytest.raises(ValueError, match=f"{op}_linear: dropout_p=0.1 cannot run inside a CUDA graph capture"):
        backward()


@interpreter_only
@pytest.mark.parametrize("op", ["lora", "qlora"])
def test_eager_door_refuses_dropout_under_capture(op, monkeypatch):
    """The eager doors (autograd.Functions) draw the seed on the host too: a torch.cuda.graph or
    make_graphed_callables capture of an uncompiled model would replay one mask every step (found by helper-180)."""
    from fastft.ops import compiled_args

    x = _t(5, K, grad=False)
    A, B = (t.detach() for t in _adapters())
    if op == "lora":
        W = _t(N, K, grad=False)
        call = lambda p: lora_linear(x, W, None, A, B, 0.5, p, backend="triton")  # noqa: E731
    else:
        w = _nf4(False)
        call = lambda p: qlora_linear(x, w, None, A, B, 0.5, p, backend="triton")  # noqa: E731
    monkeypatch.setattr(compiled_args, "capturing", lambda device: True)
    call(0.0)  # no dropout: runs
    with pytest.raises(ValueError, match=f"{op}_linear: dropout_p=0.1 cannot run inside a CUDA graph capture"):
        call(0.1)


def test_the_seed_draw_stays_outside_cuda_graphs():
    """Inductor's graph partition (mode="reduce-overhead") keeps cudagraph_unsafe ops out of its CUDA graphs; the
    draw, whose inputs are CUDA tensors and whose output is a CPU tensor, otherwise sat inside one and failed its
    recording (H200, torch 2.11) before the ops' refusal could say what to do."""
    tags = torch.ops.fastft.draw_seed.default.tags
    assert torch.Tag.cudagraph_unsafe in tags and torch.Tag.nondeterministic_seeded in tags


SEEDED_OPS = ("lora_linear", "lora_linear_backward", "qlora_linear", "qlora_linear_backward", "linear_loss",
              "linear_row_losses", "linear_row_losses_backward")


@pytest.mark.parametrize("op", SEEDED_OPS)
def test_the_ops_that_read_a_seed_have_a_twin_outside_cuda_graphs(op):
    """The seed is a CPU tensor: a CUDA-graph partition holding its reader failed cudagraph trees' recording ("storage
    data ptrs are not allocated in pool", H100, torch 2.11, 2026-12-05). With dropout the doors call NAME_dropout,
    the same schema tagged cudagraph_unsafe (inductor runs it outside the graphs, a fresh seed each step); without
    dropout NAME, untagged, stays inside them."""
    plain, twin = getattr(torch.ops.fastft, op).default, getattr(torch.ops.fastft, f"{op}_dropout").default
    assert torch.Tag.cudagraph_unsafe in twin.tags and torch.Tag.cudagraph_unsafe not in plain.tags
    assert str(plain._schema).replace(f"fastft::{op}(", "(") == str(twin._schema).replace(f"fastft::{op}_dropout(",
                                                                                          "(")


@interpreter_only
@pytest.mark.parametrize("dropout_p", [0.0, 0.1])
def test_the_traced_door_takes_the_twin_with_dropout_only(dropout_p):
    """Forward and backward graphs: fastft::lora_linear_dropout and its backward with dropout, the plain ops without
    (a model with lora_dropout=0 keeps every LoRA layer inside the CUDA graphs)."""
    torch.manual_seed(0)
    x = torch.randn(5, 32, requires_grad=True)
    W = torch.randn(24, 32) * 0.1
    A, B = (torch.randn(4, 32) * 0.1).requires_grad_(), (torch.randn(24, 4) * 0.1).requires_grad_()
    graphs = []

    def keep(gm, _):  # AOTAutograd's forward and backward graphs
        graphs.append(gm.code)
        return make_boxed_func(gm.forward)
    torch._dynamo.reset()
    compiled = torch.compile(lambda x, A, B: lora_linear(x, W, None, A, B, 2.0, dropout_p, backend="triton"),
                             backend=aot_autograd(fw_compiler=keep, bw_compiler=keep), fullgraph=True)
    compiled(x, A, B).sum().backward()
    assert len(graphs) == 2
    code = "\n".join(graphs)
    twin = dropout_p > 0
    assert ("torch.ops.fastft.lora_linear_dropout." in code) == twin
    assert ("torch.ops.fastft.lora_linear_backward_dropout." in code) == twin
    assert ("torch.ops.fastft.lora_linear." in code) != twin
    assert ("torch.ops.fastft.lora_linear_backward." in code) != twin


# ----------------------------------------------------------------------------------------------
# dora_linear

@interpreter_only
@pytest.mark.parametrize("base", ["dense", "nf4"])
def test_dora_linear_compiles(base):
    W = _t(N, K, grad=False, scale=0.05)
    w = quantize_nf4(W.detach(), blocksize=32) if base == "nf4" else W
    x, b, m = _t(2, 5, K), _t(N), (torch.rand(N, device=DEVICE) + 0.5).requires_grad_(True)
    A, B = _adapters()
    assert_compiles_like_eager(lambda x, b, A, B, m: dora_linear(x, w, b, A, B, m, 0.5, backend="triton"),
                               x, b, A, B, m, ops=("dora_row_norm", "dora_linear"))


@interpreter_only
def test_dora_linear_with_dropout_compiles_around_the_row_norm_op():
    """Dropout takes the torch reference after the Triton row norm: one graph, the row norm as its custom op, and
    under one torch.manual_seed (aot_eager runs dropout on torch's generator) what eager gives."""
    W = _t(N, K, grad=False, scale=0.05)
    x, m = _t(4, K), (torch.rand(N, device=DEVICE) + 0.5).requires_grad_(True)
    A, B = _adapters()
    fn = lambda x, A, B, m: dora_linear(x, W, None, A, B, m, 0.5, 0.2, backend="triton")  # noqa: E731
    graphs, backend = _recording()
    torch._dynamo.reset()
    compiled = torch.compile(fn, backend=backend, fullgraph=True)
    args = (x, A, B, m)
    run_with_grads(compiled, leaves(args))
    code = "\n".join(graphs)
    assert "torch.ops.fastft.dora_row_norm." in code and "torch.ops.fastft.dora_linear." not in code
    torch.manual_seed(3)
    want = run_with_grads(fn, leaves(args))
    torch.manual_seed(3)
    got = run_with_grads(compiled, leaves(args))
    for g, w in zip(got[0] + got[1], want[0] + want[1]):
        torch.testing.assert_close(g, w, atol=0, rtol=0)


# ----------------------------------------------------------------------------------------------
# whole models

class _TwoLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(K, N), nn.Linear(N, K)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def _module_compiles_like_eager(model, x, ops):
    graphs, backend = _recording()
    torch._dynamo.reset()
    params = [p for p in model.parameters() if p.requires_grad]

    def run(m):
        out = m(x)
        return out.detach(), torch.autograd.grad((out.float() * out.detach().cos()).sum(), params)

    want_out, want_grads = run(model)
    got_out, got_grads = run(torch.compile(model, backend=backend, fullgraph=True))
    code = "\n".join(graphs)
    for op in ops:
        assert code.count(f"torch.ops.fastft.{op}.") == 2, code  # both layers, one graph
    for got, want in zip((got_out, *got_grads), (want_out, *want_grads)):
        torch.testing.assert_close(got, want, atol=0, rtol=0)


@interpreter_only
@pytest.mark.parametrize("quantized", [False, True])
def test_peft_model_compiles_whole(monkeypatch, quantized):
    monkeypatch.setenv("FASTFT_LORA_BACKEND", "triton")
    torch.manual_seed(0)
    base = _TwoLayers().to(DEVICE)
    if quantized:
        base = fastft.quantize_model(base, "nf4", blocksize=32)
    model = fastft.get_peft_model(copy.deepcopy(base), LoraConfig(r=R, lora_alpha=8, target_modules=["up", "down"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    _module_compiles_like_eager(model, _t(2, 3, K, grad=False), ("qlora_linear",) if quantized else ("lora_linear",))


# ----------------------------------------------------------------------------------------------
# opcheck: schema, fake kernels against the real ones, autograd registration

@interpreter_only
def test_lora_linear_opcheck():
    x, W, b = _t(5, K), _t(N, K), _t(N)
    A, B = _adapters()
    torch.library.opcheck(lora_linear_op, (x, W, b, A, B, None, 0.5, 0.0))
    xs = torch.randn(5, 16, device=DEVICE)
    args = (torch.randn(5, N, device=DEVICE), x.detach(), W.detach(), b.detach(), A.detach(), B.detach(), xs,
            seed_tensor(0), 0.5, 0.0)
    torch.library.opcheck(lora_linear_backward_op, (*args, True, True, True, True, True), test_utils=BACKWARD_UTILS)
    torch.library.opcheck(lora_linear_backward_op, (*args, False, False, False, True, False),
                          test_utils=BACKWARD_UTILS)
    # the dropout twins (compiled_args.seeded_ops), with a drawn seed: the same checks
    torch.library.opcheck(torch.ops.fastft.lora_linear_dropout.default, (x, W, b, A, B, seed_tensor(3), 0.5, 0.1))
    dargs = (*args[:7], seed_tensor(3), 0.5, 0.1)
    torch.library.opcheck(torch.ops.fastft.lora_linear_backward_dropout.default, (*dargs, True, True, True, True, True),
                          test_utils=BACKWARD_UTILS)


@interpreter_only
def test_qlora_and_nf4_linear_opcheck():
    parts, ints = nf4_args(_nf4(True))  # double quantization: every part (the single-level weight: compile tests)
    x, b = _t(5, K), _t(N)
    A, B = _adapters()
    torch.library.opcheck(qlora_linear_op, (x, parts, ints, b, A, B, None, 0.5, 0.0))
    torch.library.opcheck(nf4_linear_op, (x, parts, ints, b))
    dy, xs = torch.randn(5, N, device=DEVICE), torch.randn(5, 16, device=DEVICE)
    torch.library.opcheck(qlora_linear_backward_op, (dy, x.detach(), parts, ints, b.detach(), A.detach(), B.detach(),
                                                     xs, seed_tensor(0), 0.5, 0.0, True, True, True, True),
                          test_utils=BACKWARD_UTILS)
    torch.library.opcheck(nf4_linear_backward_op, (dy, parts, ints, b.detach(), True, True), test_utils=BACKWARD_UTILS)
    torch.library.opcheck(nf4_linear_backward_op, (dy, parts, ints, None, True, False), test_utils=BACKWARD_UTILS)


@interpreter_only
@pytest.mark.parametrize("base", ["dense", "nf4"])
def test_dora_opcheck(base):
    W = torch.randn(N, K, device=DEVICE) * 0.05
    parts, ints = nf4_args(quantize_nf4(W, blocksize=32)) if base == "nf4" else ([W], [])
    # the dense base without the (slow) aot_dispatch_dynamic check: test_dora_linear_compiles traces it through AOT
    utils = TEST_UTILS if base == "nf4" else TEST_UTILS[:3]
    x, b, m = _t(5, K), _t(N), (torch.rand(N, device=DEVICE) + 0.5).requires_grad_(True)
    A, B = _adapters()
    row_norm = dora_row_norm_op(parts, ints, A.detach(), B.detach(), 0.5, torch.float32)
    torch.library.opcheck(dora_row_norm_op, (parts, ints, A.detach(), B.detach(), 0.5, torch.float32),
                          test_utils=utils)
    torch.library.opcheck(dora_linear_op, (x, parts, ints, b, A, B, m, 0.5, row_norm), test_utils=utils)
    y, xs, sigma, z = dora_linear_op(x.detach(), parts, ints, b.detach(), A.detach(), B.detach(), m.detach(), 0.5,
                                     row_norm)
    saved_out = z  # the op keeps its own pre-bias output for an NF4 weight or a bias (here: a bias)
    torch.library.opcheck(dora_linear_backward_op, (torch.randn(5, N, device=DEVICE), x.detach(), parts, ints,
                                                    b.detach(), A.detach(), B.detach(), m.detach(), row_norm, xs,
                                                    sigma, saved_out, 0.5, True, True, True, True, True),
                          test_utils=BACKWARD_UTILS)


@interpreter_only
def test_dora_row_norm_compiles_like_eager():
    W = torch.randn(N, K, device=DEVICE) * 0.05
    A, B = _adapters()
    for w in (W, quantize_nf4(W, blocksize=32)):
        fn = lambda A, B: dora_row_norm(w, A, B, 0.5, torch.float32, backend="triton")  # noqa: E731
        torch._dynamo.reset()
        got = torch.compile(fn, backend="aot_eager", fullgraph=True)(A, B)
        torch.testing.assert_close(got, fn(A, B), atol=0, rtol=0)


# ----------------------------------------------------------------------------------------------
# CUDA graphs (GPU only)

@pytest.mark.gpu
@pytest.mark.parametrize("op", ["lora_linear", "qlora_linear", "dora_linear"])
def test_reduce_overhead_matches_eager(op):
    torch.manual_seed(0)
    Kg, Ng, Rg = 256, 192, 16
    x = torch.randn(3, 77, Kg, device="cuda", dtype=torch.bfloat16)
    W = torch.randn(Ng, Kg, device="cuda", dtype=torch.bfloat16) * 0.05
    A = (torch.randn(Rg, Kg, device="cuda") * 0.05).requires_grad_(True)
    B = (torch.randn(Ng, Rg, device="cuda") * 0.05).requires_grad_(True)
    if op == "lora_linear":
        fn = lambda x, A, B: lora_linear(x, W, None, A, B, 2.0)  # noqa: E731
    elif op == "qlora_linear":
        w = quantize_nf4(W, double_quant=True)
        fn = lambda x, A, B: qlora_linear(x, w, None, A, B, 2.0)  # noqa: E731
    else:
        m = torch.rand(Ng, device="cuda") + 0.5
        fn = lambda x, A, B: dora_linear(x, W, None, A, B, m, 2.0)  # noqa: E731
    compiled = torch.compile(fn, mode="reduce-overhead", fullgraph=True)
    want = run_with_grads(fn, leaves((x, A, B)))
    for _ in range(3):  # warm-up, record, replay
        got = run_with_grads(compiled, leaves((x, A, B)))
    # the same kernels, except that under capture a double-quantized weight's block scales are decoded by torch
    # (the offset cannot be read to the host there), possibly an FMA's rounding away from the kernels' decode
    exact = dict(atol=0, rtol=0) if op != "qlora_linear" else {}
    for g, w_ in zip(got[0] + got[1], want[0] + want[1]):
        torch.testing.assert_close(g, w_, **exact)


@pytest.mark.gpu
def test_dropout_under_cuda_graph_capture_is_refused():
    x = torch.randn(64, 128, device="cuda", dtype=torch.bfloat16)
    W = torch.randn(96, 128, device="cuda", dtype=torch.bfloat16)
    A, B = torch.randn(8, 128, device="cuda"), torch.randn(96, 8, device="cuda")
    lora_linear(x, W, None, A, B, 1.0, 0.1)  # warm up the kernels outside the capture
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(ValueError, match="dropout_p=0.1 cannot run inside a CUDA graph"):
        with torch.cuda.graph(graph):
            lora_linear_op(x, W, None, A, B, seed_tensor(1), 1.0, 0.1)


@pytest.mark.gpu
def test_dropout_under_reduce_overhead_never_repeats_a_mask():
    """mode="reduce-overhead" with dropout: the op's cudagraph_unsafe twin (compiled_args.seeded_ops) runs outside the
    CUDA graphs, a fresh mask each call (or the capture is refused, ValueError); a replayed, repeated mask is the
    one wrong outcome. Before the twin, inductor's recording failed on the CPU seed ("not allocated in pool", H100,
    2026-12-05)."""
    torch.manual_seed(0)
    x = torch.randn(128, 256, device="cuda", dtype=torch.bfloat16)
    W = torch.randn(192, 256, device="cuda", dtype=torch.bfloat16) * 0.05
    A, B = torch.randn(16, 256, device="cuda") * 0.05, torch.randn(192, 16, device="cuda") * 0.05
    compiled = torch.compile(lambda x: lora_linear(x, W, None, A, B, 2.0, 0.1), mode="reduce-overhead",
                             fullgraph=True)
    try:
        outs = [compiled(x).clone() for _ in range(4)]
    except ValueError as err:
        assert "cannot run inside a CUDA graph" in str(err)
        return
    assert all(not torch.equal(a, b) for a, b in zip(outs, outs[1:]))


@pytest.mark.gpu
def test_dropout_under_activation_checkpointing_with_inductor_on_gpu():
    torch.manual_seed(0)
    x = torch.randn(3, 77, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    W = torch.randn(192, 256, device="cuda", dtype=torch.bfloat16) * 0.05
    A = (torch.randn(16, 256, device="cuda") * 0.05).requires_grad_(True)
    B = (torch.randn(192, 16, device="cuda") * 0.05).requires_grad_(True)

    def fn(x, A, B):
        layer = lambda x: torch.relu(lora_linear(x, W, None, A, B, 2.0, 0.1)) * 2  # noqa: E731
        return torch.utils.checkpoint.checkpoint(layer, x, use_reentrant=False)

    compiled = torch.compile(fn, fullgraph=True)
    run_with_grads(compiled, leaves((x, A, B)))
    torch.manual_seed(7)
    want = run_with_grads(fn, leaves((x, A, B)))
    torch.manual_seed(7)
    got = run_with_grads(compiled, leaves((x, A, B)))
    for g, w in zip(got[0] + got[1], want[0] + want[1]):
        torch.testing.assert_close(g, w, atol=0, rtol=0)
