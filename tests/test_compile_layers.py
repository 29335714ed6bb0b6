"""RoPE, SwiGLU/GeGLU, IA3 and the bottleneck adapter under torch.compile (fullgraph: no graph break) as their
fastft:: custom ops, giving what eager gives, forward and backward; torch.library.opcheck on every custom op
(schema, fake kernels against the real ones, autograd registration). Triton through the interpreter on CPU
(fastft.ops.compiled); the reduce-overhead (CUDA graph) tests at the end need a GPU."""
import pytest
import torch

from fastft.ops import geglu, ia3_linear, rope, rope_, rope_cos_sin, swiglu
from fastft.ops.bottleneck_adapter import bottleneck_adapter, bottleneck_adapter_backward_op, bottleneck_adapter_op
from fastft.ops.glu import glu_backward_op, glu_op
from fastft.ops.ia3 import ia3_linear_backward_op, ia3_linear_op
from fastft.ops.rope import rope_backward_op, rope_inplace_op, rope_op
from tests.compile_utils import assert_compiles_like_eager
from tests.utils import interpreter_only

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _t(*shape, dtype=torch.float32, grad=True):
    return torch.randn(*shape, device=DEVICE, dtype=dtype).requires_grad_(grad)


def _inv_freq(head_dim):
    return 1.0 / (10000 ** (torch.arange(0, head_dim, 2, device=DEVICE, dtype=torch.float32) / head_dim))


def _positions(B, S):
    """Positions (B, S), restarting inside each row (packed documents) when S allows."""
    pos = torch.arange(S, device=DEVICE) if S < 3 else torch.cat([torch.arange(2, device=DEVICE),
                                                                  torch.arange(S - 2, device=DEVICE)])
    return pos.expand(B, S)


def _projection(x, heads, D, layout):
    """q or k as transformers holds it: a (B, H, S, D) transpose view of a (B, S, H·D) projection, or (B, S, H, D)."""
    B, S = x.shape[:2]
    t = (x * 1).view(B, S, heads, D)
    return t.transpose(1, 2) if layout == "view" else t


# Triton's interpreter runs RoPE's one-program-per-token grid at ~70 ms a program: 3 or 4 tokens.
# ------------------------------------------------------------------------------------------------- RoPE
@interpreter_only
@pytest.mark.parametrize("source,layout,dynamic", [("cos_sin", "view", False), ("cos_sin_bcast", "bshd", False),
                                                   ("position_ids", "view", True)])
def test_rope_compiles(source, layout, dynamic):
    """Out of place, GQA heads, on transpose views or (B, S, H, D); cos/sin given ((B, S, D) or broadcast (1, S, D))
    or built from packed position_ids (rope_cos_sin traced into the graph)."""
    torch.manual_seed(0)
    B, S, HQ, HK, D = (2, 2, 3, 1, 8) if source == "cos_sin_bcast" else (1, 3, 3, 1, 8)
    unsqueeze_dim = 1 if layout == "view" else 2
    xq, xk = _t(B, S, HQ * D), _t(B, S, HK * D)
    pos, inv = _positions(B, S), _inv_freq(D)
    cos, sin = rope_cos_sin(pos, inv)
    if source == "cos_sin_bcast":
        cos, sin = cos[:1], sin[:1]

    def fn(xq, xk):
        q, k = _projection(xq, HQ, D, layout), _projection(xk, HK, D, layout)
        if source == "position_ids":
            return rope(q, k, position_ids=pos, inv_freq=inv, unsqueeze_dim=unsqueeze_dim, backend="triton")
        return rope(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim, backend="triton")

    assert_compiles_like_eager(fn, xq, xk, ops=("rope",), dynamic=dynamic)


@interpreter_only
@pytest.mark.parametrize("layout", ["view", "plain"])
def test_rope_inplace_with_autograd_compiles(layout):
    """rope_ where autograd records it: on transpose views (eager: out of place + copy) and on plain tensors (eager:
    the in-place Function); traced, both are fastft::rope plus copies into q and k. The views' base (the
    projection) comes back rotated, and gradients reach x."""
    torch.manual_seed(0)
    B, S, HQ, HK, D = 1, 3, 2, 2, 8
    xq, xk = _t(B, S, HQ * D), _t(B, HK, S, D)
    cos, sin = rope_cos_sin(_positions(B, S), _inv_freq(D))

    def fn(xq, xk):
        if layout == "view":
            base = xq * 1
            q = base.view(B, S, HQ, D).transpose(1, 2)
        else:
            base = q = (xq * 1).view(B, S, HQ, D).transpose(1, 2).contiguous()
        k = xk * 1
        q_out, k_out = rope_(q, k, cos, sin, backend="triton")
        return q_out, k_out, base

    assert_compiles_like_eager(fn, xq, xk, ops=("rope",))


@interpreter_only
def test_rope_inplace_without_autograd_compiles():
    """rope_ without autograd (inference) is fastft::rope_, mutating q and k: here the compiled function's own
    inputs, transpose views as transformers passes them (cos/sin from position_ids), which end up as eager
    rotates them; and through aot_autograd (functionalized) on views of intermediates, with cos/sin given."""
    torch.manual_seed(0)
    B, S, HQ, HK, D = 1, 3, 2, 1, 8
    pos, inv = _positions(B, S), _inv_freq(D)
    cos, sin = rope_cos_sin(pos, inv)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm.code)
        return gm.forward

    def fn(q, k):
        rope_(q, k, position_ids=pos, inv_freq=inv, backend="triton")

    xq, xk = _t(B, S, HQ * D, grad=False), _t(B, S, HK * D, grad=False)
    original, want_q, want_k = xq.clone(), xq.clone(), xk.clone()
    fn(want_q.view(B, S, HQ, D).transpose(1, 2), want_k.view(B, S, HK, D).transpose(1, 2))
    torch._dynamo.reset()
    torch.compile(fn, backend=backend, fullgraph=True)(xq.view(B, S, HQ, D).transpose(1, 2),
                                                       xk.view(B, S, HK, D).transpose(1, 2))
    assert "torch.ops.fastft.rope_." in "\n".join(graphs)
    assert not torch.equal(xq, original)  # (the inputs changed at all)
    torch.testing.assert_close(xq, want_q, atol=0, rtol=0)
    torch.testing.assert_close(xk, want_k, atol=0, rtol=0)

    def rotated_copies(xq, xk):
        q, k = _projection(xq, HQ, D, "view"), _projection(xk, HK, D, "view")
        rope_(q, k, cos, sin, backend="triton")
        return q, k

    assert_compiles_like_eager(rotated_copies, xq, xk, ops=("rope_",))


@interpreter_only
def test_rope_opcheck():
    torch.manual_seed(0)
    B, S, HQ, HK, D = 1, 3, 2, 1, 8
    cos, sin = rope_cos_sin(_positions(B, S), _inv_freq(D))
    q = _t(B, S, HQ * D).view(B, S, HQ, D).transpose(1, 2)
    k = _t(B, HK, S, D)
    torch.library.opcheck(rope_op, (q, k, cos[:1], sin[:1], 1))
    torch.library.opcheck(rope_backward_op, (torch.randn_like(q.detach()), torch.randn_like(k.detach()), cos, sin, 1))
    torch.library.opcheck(rope_inplace_op, (q.detach().clone(), k.detach().clone(), cos, sin, 1))


# -------------------------------------------------------------------------------------------------- GLU
@interpreter_only
@pytest.mark.parametrize("gelu,fused_input,dtype,dynamic", [(False, False, torch.float32, True),
                                                            (True, True, torch.float16, False)])
def test_glu_compiles(gelu, fused_input, dtype, dynamic):
    """SwiGLU on separate gate/up; GeGLU on the halves of one fused gate_up projection (row stride 2N)."""
    torch.manual_seed(0)
    op = geglu if gelu else swiglu
    if fused_input:
        gu = _t(2, 3, 2 * 13, dtype=dtype)
        assert_compiles_like_eager(lambda gu: op(gu[..., :13], gu[..., 13:], backend="triton"), gu,
                                   ops=("glu",), dynamic=dynamic)
    else:
        assert_compiles_like_eager(lambda g, u: op(g, u, backend="triton"), _t(3, 11, dtype=dtype),
                                   _t(3, 11, dtype=dtype), ops=("glu",), dynamic=dynamic)


@interpreter_only
def test_glu_opcheck():
    torch.manual_seed(0)
    gu = _t(3, 2 * 9)
    torch.library.opcheck(glu_op, (gu[:, :9], gu[:, 9:], True))
    torch.library.opcheck(glu_op, (_t(2, 3, 9), _t(2, 3, 9), False))
    torch.library.opcheck(glu_backward_op, (torch.randn(3, 9), gu[:, :9].detach(), gu[:, 9:].detach(), False))


# -------------------------------------------------------------------------------------------------- IA3
@interpreter_only
@pytest.mark.parametrize("feedforward,with_bias,x_grad,dynamic", [(True, True, True, False), (False, True, True, True),
                                                                  (True, False, False, False),
                                                                  (False, False, False, False)])
def test_ia3_linear_compiles(feedforward, with_bias, x_grad, dynamic):
    """Input scale (feed-forward) and output scale, bias or none, x needing a gradient or not (the first layer);
    W frozen, l in peft's shapes ((1, K) / (N, 1))."""
    torch.manual_seed(0)
    N, K = 10, 12
    x, w, l = _t(2, 3, K, grad=x_grad), _t(N, K, grad=False), _t(*((1, K) if feedforward else (N, 1)))
    if with_bias:
        assert_compiles_like_eager(lambda x, b, l: ia3_linear(x, w, b, l, feedforward=feedforward, backend="triton"),
                                   x, _t(N), l, ops=("ia3_linear",), dynamic=dynamic)
    else:
        assert_compiles_like_eager(lambda x, l: ia3_linear(x, w, None, l, feedforward=feedforward, backend="triton"),
                                   x, l, ops=("ia3_linear",), dynamic=dynamic)


@interpreter_only
def test_ia3_linear_opcheck():
    torch.manual_seed(0)
    N, K = 10, 12
    x, w, b = _t(5, K), _t(N, K, grad=False), _t(N)
    torch.library.opcheck(ia3_linear_op, (x, w, b, _t(1, K), True))
    torch.library.opcheck(ia3_linear_op, (x, w, None, _t(N, 1), False))
    dy, y = torch.randn(5, N, device=DEVICE), torch.randn(5, N, device=DEVICE)
    torch.library.opcheck(ia3_linear_backward_op, (dy, x.detach(), w, b.detach(), torch.rand(1, K) + 0.5, True,
                                                   True, True, True))
    torch.library.opcheck(ia3_linear_backward_op, (dy, y, w, None, torch.rand(N, 1) + 0.5, False, False, False, True))


# ---------------------------------------------------------------------------------------- bottleneck adapter
@interpreter_only
@pytest.mark.parametrize("activation,down_bias,up_bias,dtype,dynamic", [
    ("relu", True, True, torch.float32, False), ("silu", False, False, torch.float32, False),
    ("gelu_tanh", True, False, torch.float32, True), ("tanh", False, True, torch.float16, False)])
def test_bottleneck_adapter_compiles(activation, down_bias, up_bias, dtype, dynamic):
    """Each activation, biases both/none/one; fp16 h with fp32 adapter weights (the cast and padding path)."""
    torch.manual_seed(0)
    N, r = 12, 5
    h, D, U = _t(2, 3, N, dtype=dtype), _t(r, N), _t(N, r)
    bd, bu = (_t(r) if down_bias else None), (_t(N) if up_bias else None)
    args = [t for t in (h, D, bd, U, bu) if t is not None]

    def fn(*args):
        it = iter(args)
        h, D = next(it), next(it)
        b_d = next(it) if down_bias else None
        U = next(it)
        b_u = next(it) if up_bias else None
        return bottleneck_adapter(h, D, b_d, U, b_u, activation, backend="triton")

    assert_compiles_like_eager(fn, *args, ops=("bottleneck_adapter",), dynamic=dynamic)


@interpreter_only
def test_bottleneck_adapter_opcheck():
    torch.manual_seed(0)
    N, r = 12, 5
    h, D, bd, U, bu = _t(4, N), _t(r, N), _t(r), _t(N, r), _t(N)
    torch.library.opcheck(bottleneck_adapter_op, (h, D, bd, U, bu, "silu"))
    torch.library.opcheck(bottleneck_adapter_op, (h, D, None, U, None, "relu"))
    _, z, p = bottleneck_adapter_op(h.detach(), D.detach(), bd.detach(), U.detach(), bu.detach(), "tanh")
    weights = (D.detach(), bd.detach(), U.detach(), bu.detach())
    torch.library.opcheck(bottleneck_adapter_backward_op, (torch.randn(4, N), h.detach(), *weights, z, p, "tanh",
                                                           [True, True, True, True, True]))
    torch.library.opcheck(bottleneck_adapter_backward_op, (torch.randn(4, N), h.detach(), D.detach(), None,
                                                           U.detach(), None, z, p, "tanh",
                                                           [False, True, False, True, False]))


# ------------------------------------------------------------------------------------------------ model
@interpreter_only
def test_patched_llama_compiles():
    """A tiny Llama through fastft.patch_model (norms, RoPE, GLU MLP; transformers' attention) compiles with
    fullgraph=True, its norms, RoPE and GLU as fastft:: ops, and gives eager's logits and parameter gradients."""
    from torch._dynamo.backends.debugging import aot_eager

    import fastft
    from tests.utils import tiny_llama

    model = tiny_llama(num_hidden_layers=1, hidden_size=32, intermediate_size=48, num_attention_heads=2,
                       num_key_value_heads=1)
    fastft.patch_model(model, backend="triton", attention=False)
    ids = torch.randint(0, 128, (1, 4))
    params = [p for p in model.parameters() if p.requires_grad]

    def step(forward):
        logits = forward(ids)
        cot = torch.randn(logits.shape, generator=torch.Generator().manual_seed(0))
        return [logits.detach(), *torch.autograd.grad((logits * cot).sum(), params)]

    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm.code)
        return aot_eager(gm, example_inputs)

    torch._dynamo.reset()
    want = step(lambda ids: model(input_ids=ids).logits)
    got = step(torch.compile(lambda ids: model(input_ids=ids).logits, backend=backend, fullgraph=True))
    code = "\n".join(graphs)
    for op in ("rms_norm", "rope", "glu"):
        assert f"torch.ops.fastft.{op}." in code, f"fastft::{op} is not in the model's graph"
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=0, rtol=0)


# -------------------------------------------------------------------------------------------- GPU only
def _reduce_overhead_like_eager(fn, *args, steps=3):
    """mode="reduce-overhead" (CUDA graphs, after cudagraph trees' warm-up runs) gives eager's outputs and grads on
    every step."""
    from tests.compile_utils import leaves, run_with_grads

    torch._dynamo.reset()
    want_out, want_grads = run_with_grads(fn, leaves(args))
    compiled = torch.compile(fn, mode="reduce-overhead", fullgraph=True)
    for _ in range(steps):
        got_out, got_grads = run_with_grads(compiled, leaves(args))
        for got, want in zip(got_out + got_grads, want_out + want_grads):
            torch.testing.assert_close(got, want)  # (dtype-wise defaults: inductor may fuse the glue around the op)


@pytest.mark.gpu
def test_layer_ops_reduce_overhead_gpu():
    """Each op compiled with mode="reduce-overhead" (its custom op captured in a CUDA graph, replayed) equals eager."""
    torch.manual_seed(0)
    B, S, HQ, HK, D, N, r = 2, 64, 8, 2, 64, 256, 16
    xq, xk = _t(B, S, HQ * D, dtype=torch.bfloat16), _t(B, S, HK * D, dtype=torch.bfloat16)
    cos, sin = rope_cos_sin(_positions(B, S), _inv_freq(D), 1.0, torch.bfloat16)  # (eager's, not inductor's cos)
    _reduce_overhead_like_eager(lambda xq, xk: rope(_projection(xq, HQ, D, "view"), _projection(xk, HK, D, "view"),
                                                    cos, sin), xq, xk)
    gu = _t(B * S, 2 * N, dtype=torch.bfloat16)
    _reduce_overhead_like_eager(lambda gu: swiglu(gu[:, :N], gu[:, N:]), gu)
    x, w, b = _t(B, S, N, dtype=torch.bfloat16), _t(N, N, dtype=torch.bfloat16, grad=False), _t(N, dtype=torch.bfloat16)
    for feedforward in (True, False):
        l = _t(*((1, N) if feedforward else (N, 1)), dtype=torch.bfloat16)
        _reduce_overhead_like_eager(lambda x, b, l: ia3_linear(x, w, b, l, feedforward=feedforward), x, b, l)
    Dw, bd, U, bu = _t(r, N), _t(r), _t(N, r), _t(N)
    _reduce_overhead_like_eager(lambda h, Dw, bd, U, bu: bottleneck_adapter(h, Dw, bd, U, bu, "gelu_tanh"),
                                x, Dw, bd, U, bu)
