"""Edge cases of the ops a review found: double backward through the fused ops (refused, never silently wrong),
DoRA's magnitude gradient under a dominant bias, rope_ on q and k that share memory, rope's output dtype per
backend, bias checks (IA3, DoRA, linear losses), arguments that reached the ops unvalidated, and DPO on an empty
batch. Small sizes: the Triton kernels run through the interpreter on CPU."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastft.ops import (dora_linear, flash_attention, geglu, ia3_linear, linear_cross_entropy, linear_dpo_loss,
                        linear_dpo_loss_reference, lora_linear, nf4_linear, qlora_linear, rms_norm, rope, rope_,
                        rope_reference, swiglu)
from fastft.ops.bottleneck_adapter import bottleneck_adapter
from fastft.quant import quantize_nf4
from tests.utils import INTERPRET, assert_close, interpreter_only

BACKENDS = ["torch"] + (["triton"] if INTERPRET else [])


def _tables(S: int, D: int, dtype=torch.float32):
    inv = 1.0 / (10000 ** (torch.arange(0, D, 2).float() / D))
    freqs = torch.arange(S)[None, :, None].float() * inv
    emb = torch.cat((freqs, freqs), -1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


# ---------------------------------------------------------------------------------------------- double backward
def _double_backward_cases():
    x, W, b = torch.randn(4, 16), torch.randn(8, 16) / 4, torch.randn(8)
    A, B = torch.randn(2, 16), torch.randn(8, 2)
    qw = quantize_nf4(torch.randn(8, 64) / 8, blocksize=32)
    x64, A64 = torch.randn(4, 64), torch.randn(2, 64)
    m = torch.rand(8) + 0.5
    q, k, v = (torch.randn(1, 5, 2, 16) for _ in range(3))
    cos, sin = _tables(5, 16)
    labels = torch.randint(0, 8, (4,))

    def rope_in_place(q, k):  # plain (non-view) tensors: the in-place Function
        return torch.cat([t.flatten() for t in rope_(q * 1.0, k * 1.0, cos, sin, unsqueeze_dim=2, backend="triton")])

    return {  # name: (fn of tensors that all require grad, the tensors)
        "lora_linear": (lambda x, A, B: lora_linear(x, W, b, A, B, 0.5, backend="triton"), (x, A, B)),
        "qlora_linear": (lambda x, A: qlora_linear(x, qw, None, A, B, 0.5, backend="triton"), (x64, A64)),
        "nf4_linear": (lambda x, b: nf4_linear(x, qw, b, backend="triton"), (x64, b)),
        "dora_linear": (lambda x, m: dora_linear(x, W, b, A, B, m, 0.5, backend="triton"), (x, m)),
        "dora_linear_nf4": (lambda x, m: dora_linear(x, qw, b, A64, B, m, 0.5, backend="triton"), (x64, m)),
        "ia3_linear_feedforward": (lambda x, l: ia3_linear(x, W, b, l, feedforward=True, backend="triton"),
                                   (x, torch.rand(16) + 0.5)),
        "ia3_linear_output": (lambda x, l: ia3_linear(x, W, b, l, feedforward=False, backend="triton"),
                              (x, torch.rand(8) + 0.5)),
        "rms_norm": (lambda x, w: rms_norm(x, w, backend="triton"), (x, torch.randn(16))),
        "rms_norm_residual": (lambda x, r: torch.cat(rms_norm(x, torch.ones(16), residual=r, backend="triton")),
                              (x, torch.randn(4, 16))),
        "swiglu": (lambda g, u: swiglu(g, u, backend="triton"), (x, torch.randn(4, 16))),
        "geglu": (lambda g, u: geglu(g, u, backend="triton"), (x, torch.randn(4, 16))),
        "bottleneck_adapter": (lambda h, D, U: bottleneck_adapter(h, D, None, U, None, "tanh", backend="triton"),
                               (x, torch.randn(3, 16), torch.randn(16, 3))),
        "flash_attention": (lambda q, k, v: flash_attention(q, k, v, backend="triton"), (q, k, v)),
        "rope": (lambda q, k: torch.cat([t.flatten() for t in rope(q, k, cos, sin, unsqueeze_dim=2,
                                                                   backend="triton")]), (q, k)),
        "rope_": (rope_in_place, (q, k)),
        # scalar losses: their grad_output is a constant 1, the gradient still depends on the inputs
        "linear_cross_entropy": (lambda h, w: linear_cross_entropy(h, w, labels, backend="triton"), (x, W)),
        "linear_cross_entropy_none": (lambda h, w: linear_cross_entropy(h, w, labels, reduction="none",
                                                                        backend="triton").sum(), (x, W)),
        "linear_cross_entropy_none_dh_only": (lambda h: linear_cross_entropy(h, W, labels, reduction="none",
                                                                             backend="triton").sum(), (x,)),
    }


DOUBLE_BACKWARD = _double_backward_cases()


@interpreter_only
@pytest.mark.parametrize("name", DOUBLE_BACKWARD)
def test_double_backward_through_triton_ops_is_refused(name):
    """A gradient penalty (create_graph=True, then a gradient of the gradient) through a fused op: its backward
    runs kernels that record no graph, so the second-order terms would be silently missing; it raises instead."""
    fn, tensors = DOUBLE_BACKWARD[name]
    inputs = [t.detach().clone().requires_grad_(True) for t in tensors]
    out = fn(*inputs)
    objective = out.float().square().sum() if out.dim() else out
    # the losses make their gradients chunk by chunk on the torch backend too: they name their references
    advice = "linear_cross_entropy_reference" if name.startswith("linear_") else "backend='torch'"
    with pytest.raises(RuntimeError, match=f"cannot be differentiated twice.*{advice}"):
        g = torch.autograd.grad(objective, inputs[0], create_graph=True)[0]
        torch.autograd.grad(objective + g.float().square().sum(), inputs[-1])


@interpreter_only
def test_first_order_gradients_unchanged_and_torch_backend_gives_second_order():
    """Without create_graph the fused backward runs as before; the torch backend (named in the error) gives the
    second-order terms."""
    x, W, A, B = torch.randn(4, 16), torch.randn(8, 16), torch.randn(2, 16), torch.randn(8, 2)

    def penalty_grads(backend, dtype):
        xi, Ai, Bi = (t.to(dtype).requires_grad_(True) for t in (x, A, B))
        y = lora_linear(xi, W.to(dtype), None, Ai, Bi, 0.5, backend=backend)
        objective = y.square().sum()
        if backend == "triton":
            return torch.autograd.grad(objective, (Ai, Bi))
        (g,) = torch.autograd.grad(objective, xi, create_graph=True)
        return torch.autograd.grad(objective + g.square().sum(), (Ai, Bi))

    def reference(dtype):
        xi, Ai, Bi = (t.to(dtype).requires_grad_(True) for t in (x, A, B))
        objective = (F.linear(xi, W.to(dtype)) + 0.5 * (xi @ Ai.t()) @ Bi.t()).square().sum()
        first = torch.autograd.grad(objective, (Ai, Bi), retain_graph=True)
        (g,) = torch.autograd.grad(objective, xi, create_graph=True)
        return first, torch.autograd.grad(objective + g.square().sum(), (Ai, Bi))

    first, second = reference(torch.float64)
    for got, want in zip(penalty_grads("triton", torch.float32), first):
        assert_close(got, want, torch.float32, "first-order gradient")
    for got, want in zip(penalty_grads("torch", torch.float32), second):
        assert_close(got, want, torch.float32, "second-order gradient")


# ---------------------------------------------------------------------------------------------- DoRA magnitude
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_dora_magnitude_gradient_with_a_dominant_bias(dtype, backend):
    """|b| >> |x·W'ᵀ| (Qwen-style q/k/v biases): dm = Σ dy·z/‖W'‖ must not come from the rounded y − b (on the
    fused path it did: bf16 164% error at |b| ~ 300, fp32 4e-5)."""
    _check_dora_dominant_bias(dtype, lambda *args: dora_linear(*args, backend=backend))


@interpreter_only
def test_dora_magnitude_gradient_with_a_dominant_bias_compiled():
    """The traced door (fastft::dora_linear, which returns the pre-bias output for backward) too."""
    torch._dynamo.reset()
    _check_dora_dominant_bias(torch.bfloat16, torch.compile(lambda *args: dora_linear(*args, backend="triton"),
                                                            backend="aot_eager", fullgraph=True))


def _check_dora_dominant_bias(dtype, dora):
    M, K, N, r, s = 64, 64, 32, 4, 0.5
    x, W = torch.randn(M, K), torch.randn(N, K) / 8
    A, B = torch.randn(r, K) / 8, torch.randn(N, r) / 8
    b = torch.randn(N) * 300
    m0 = torch.linalg.norm(W + s * B @ A, dim=1) * 1.1
    dy = torch.randn(M, N).to(dtype)
    xd, Wd, bd = x.to(dtype), W.to(dtype), b.to(dtype)
    Wp = Wd.double() + s * B.double() @ A.double()
    z = xd.double() @ Wp.t()
    dm_ref = (dy.double() * z).sum(0) / torch.linalg.norm(Wp, dim=1)

    m = m0.clone().requires_grad_(True)
    xg, bg = xd.clone().requires_grad_(True), bd.clone().requires_grad_(True)
    y = dora(xg, Wd, bg, A, B, m, s)
    dx, db, dm = torch.autograd.grad(y, (xg, bg, m), dy)
    sigma = m0.double() / torch.linalg.norm(Wp, dim=1)
    assert_close(y, sigma * z + bd.double(), dtype, "y")
    assert_close(dm, dm_ref, dtype, "d magnitude")
    assert_close(dx, (dy.double() * sigma) @ Wp, dtype, "dx")
    assert_close(db, dy.double().sum(0), dtype, "d bias")


# ---------------------------------------------------------------------------------------------- RoPE
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("grad", [False, True])
def test_rope_inplace_on_one_tensor_rotates_once(backend, grad):
    """rope_(t, t): q and k are one tensor; the Triton kernel rotated q in place and then k, the same memory: twice."""
    cos, sin = _tables(3, 16)
    t0 = torch.randn(1, 2, 3, 16, requires_grad=grad)
    t = t0 * 1.0  # not a leaf: may be written in place under autograd
    want, _ = rope_reference(t0.detach().double(), t0.detach().double(), cos.double(), sin.double())
    q_out, k_out = rope_(t, t, cos, sin, backend=backend)
    assert q_out is t and k_out is t
    assert (t.double() - want).abs().max() < 1e-5
    if grad:
        cot = torch.randn_like(t)
        (got,) = torch.autograd.grad(t, t0, cot)
        (ref,) = torch.autograd.grad(rope_reference(t0, t0, cos, sin)[0], t0, cot)
        assert (got - ref).abs().max() < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_rope_inplace_on_overlapping_views_rotates_each_element_once(backend):
    """q = heads 0–1, k = heads 1–2 of one tensor: head 1 is in both and must be rotated once, as on torch."""
    cos, sin = _tables(3, 16)
    t = torch.randn(1, 3, 3, 16)
    want, _ = rope_reference(t.double(), t.double(), cos.double(), sin.double())
    rope_(t[:, 0:2], t[:, 1:3], cos, sin, backend=backend)
    assert (t.double() - want).abs().max() < 1e-5


@interpreter_only
def test_rope_inplace_on_one_tensor_rotates_once_compiled():
    """The traced door (fastft::rope_, whose body runs on real tensors) rotates once too."""
    cos, sin = _tables(3, 16)
    t = torch.randn(1, 2, 3, 16)
    want, _ = rope_reference(t.double(), t.double(), cos.double(), sin.double())

    def fn(t):
        rope_(t, t, cos, sin, backend="triton")
        return t

    torch._dynamo.reset()
    out = torch.compile(fn, backend="aot_eager", fullgraph=True)(t)
    assert (out.double() - want).abs().max() < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("inplace", [False, True])
def test_rope_returns_q_dtype_with_fp32_tables(backend, inplace):
    """bf16 q/k with fp32 cos/sin: the output is bf16 on both backends (the torch reference promoted it to fp32,
    and flash_attention then refused the mixed q/k/v dtypes on that backend only)."""
    cos, sin = _tables(4, 16)
    q, k = torch.randn(1, 2, 4, 16, dtype=torch.bfloat16), torch.randn(1, 2, 4, 16, dtype=torch.bfloat16)
    want = rope_reference(q.double(), k.double(), cos.double(), sin.double())
    got = (rope_ if inplace else rope)(q.clone(), k.clone(), cos, sin, backend=backend)
    for g, w in zip(got, want):
        assert g.dtype == torch.bfloat16
        assert_close(g, w, torch.bfloat16, "rotated")
    v = torch.randn(1, 4, 2, 16, dtype=torch.bfloat16)
    flash_attention(got[0].transpose(1, 2), got[1].transpose(1, 2), v, backend=backend)
    assert all(t.dtype == torch.bfloat16 for t in rope_reference(q, k, cos, sin))


# ---------------------------------------------------------------------------------------------- IA3 bias
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("feedforward", [True, False])
def test_ia3_fp32_bias_with_bf16_input(backend, feedforward):
    """A float bias of another dtype is taken on both backends (the torch path crashed inside F.linear)."""
    x, W, b = torch.randn(4, 16).bfloat16(), torch.randn(8, 16).bfloat16(), torch.randn(8)
    l = torch.rand(16 if feedforward else 8) + 0.5
    bg = b.clone().requires_grad_(True)
    y = ia3_linear(x, W, bg, l, feedforward=feedforward, backend=backend)
    assert y.dtype == torch.bfloat16
    xs = x.double() * l.double() if feedforward else x.double()
    want = F.linear(xs, W.double(), b.double())
    assert_close(y, want if feedforward else want * l.double(), torch.bfloat16, "y")
    y.float().sum().backward()
    assert bg.grad.dtype == torch.float32


# ---------------------------------------------------------------------------------------------- argument checks
def _x():
    return torch.randn(4, 16)


REFUSED = {  # name: (call taking the backend, the argument the message must name)
    "rope q None": (lambda be: rope(None, torch.randn(1, 1, 2, 16), torch.ones(1, 2, 16), torch.ones(1, 2, 16),
                                    backend=be), "`q`"),
    "rope_ q None": (lambda be: rope_(None, torch.randn(1, 1, 2, 16), torch.ones(1, 2, 16), torch.ones(1, 2, 16),
                                      backend=be), "`q`"),
    "rope q None with positions": (lambda be: rope(None, torch.randn(1, 1, 2, 16), position_ids=torch.zeros(
        1, 2, dtype=torch.long), inv_freq=torch.ones(8), backend=be), "`q`"),
    "ia3 bias list": (lambda be: ia3_linear(_x(), torch.randn(8, 16), [0.0] * 8, torch.ones(16), feedforward=True,
                                            backend=be), "`bias`"),
    "ia3 bias int": (lambda be: ia3_linear(_x(), torch.randn(8, 16), torch.arange(8), torch.ones(16),
                                           feedforward=True, backend=be), "`bias`"),
    "ia3 bias shape": (lambda be: ia3_linear(_x(), torch.randn(8, 16), torch.randn(7), torch.ones(16),
                                             feedforward=True, backend=be), "`bias`"),
    "ia3 bias device": (lambda be: ia3_linear(_x(), torch.randn(8, 16), torch.randn(8, device="meta"),
                                              torch.ones(16), feedforward=True, backend=be), "one device"),
    "ia3 x 0-d": (lambda be: ia3_linear(torch.tensor(1.0), torch.randn(8, 16), None, torch.ones(16),
                                        feedforward=True, backend=be), "`x`"),
    "adapter down_weight None": (lambda be: bottleneck_adapter(_x(), None, None, torch.randn(16, 2), None,
                                                               backend=be), "`down_weight`"),
    "adapter down_weight list": (lambda be: bottleneck_adapter(_x(), [[0.0] * 16] * 2, None, torch.randn(16, 2),
                                                               None, backend=be), "`down_weight`"),
    "adapter up_weight list": (lambda be: bottleneck_adapter(_x(), torch.randn(2, 16), None, [[0.0] * 2] * 16,
                                                             None, backend=be), "`up_weight`"),
    "adapter down_weight int": (lambda be: bottleneck_adapter(_x(), torch.ones(2, 16, dtype=torch.long), None,
                                                              torch.randn(16, 2), None, backend=be), "`down_weight`"),
    "adapter up_weight int": (lambda be: bottleneck_adapter(_x(), torch.randn(2, 16), None,
                                                            torch.ones(16, 2, dtype=torch.long), None, backend=be),
                              "`up_weight`"),
    "adapter down_bias list": (lambda be: bottleneck_adapter(_x(), torch.randn(2, 16), [0.0, 0.0],
                                                             torch.randn(16, 2), None, backend=be), "`down_bias`"),
    "dpo weight None": (lambda be: linear_dpo_loss(
        torch.randn(1, 4, 16), torch.randn(1, 4, 16), None, torch.zeros(1, 4, dtype=torch.long),
        torch.zeros(1, 4, dtype=torch.long), ref_chosen_logps=torch.zeros(1), ref_rejected_logps=torch.zeros(1),
        backend=be), "`weight`"),
    "rms_norm eps inf": (lambda be: rms_norm(_x(), torch.ones(16), float("inf"), backend=be), "`eps`"),
    "rms_norm eps nan": (lambda be: rms_norm(_x(), torch.ones(16), float("nan"), backend=be), "`eps`"),
    "rms_norm eps True": (lambda be: rms_norm(_x(), torch.ones(16), True, backend=be), "`eps`"),
    "rms_norm offset nan": (lambda be: rms_norm(_x(), torch.ones(16), offset=float("nan"), backend=be), "`offset`"),
    "rms_norm offset inf": (lambda be: rms_norm(_x(), torch.ones(16), offset=float("inf"), backend=be), "`offset`"),
    "rms_norm offset True": (lambda be: rms_norm(_x(), torch.ones(16), offset=True, backend=be), "`offset`"),
    "ce softcap True": (lambda be: linear_cross_entropy(_x(), torch.randn(8, 16), torch.zeros(4, dtype=torch.long),
                                                        softcap=True, backend=be), "`softcap`"),
    "ce bias int": (lambda be: linear_cross_entropy(_x(), torch.randn(8, 16), torch.zeros(4, dtype=torch.long),
                                                    bias=torch.ones(8, dtype=torch.long), backend=be), "`bias`"),
    "lora scaling True": (lambda be: lora_linear(_x(), torch.randn(8, 16), None, torch.randn(2, 16),
                                                 torch.randn(8, 2), True, backend=be), "`scaling`"),
    "qlora scaling True": (lambda be: qlora_linear(torch.randn(4, 64), quantize_nf4(torch.randn(8, 64)), None,
                                                   torch.randn(2, 64), torch.randn(8, 2), True, backend=be),
                           "`scaling`"),
    "dora scaling True": (lambda be: dora_linear(_x(), torch.randn(8, 16), None, torch.randn(2, 16),
                                                 torch.randn(8, 2), torch.ones(8), True, backend=be), "`scaling`"),
    "dora bias int": (lambda be: dora_linear(_x(), torch.randn(8, 16), torch.ones(8, dtype=torch.long),
                                             torch.randn(2, 16), torch.randn(8, 2), torch.ones(8), 0.5, backend=be),
                      "`bias`"),
    "dora bias device": (lambda be: dora_linear(_x(), torch.randn(8, 16), torch.ones(8, device="meta"),
                                                torch.randn(2, 16), torch.randn(8, 2), torch.ones(8), 0.5,
                                                backend=be), "one device"),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", REFUSED)
def test_refused_with_a_value_error_naming_the_argument(case, backend):
    call, name = REFUSED[case]
    with pytest.raises(ValueError, match=name):
        call(backend)


# ---------------------------------------------------------------------------------------------- DPO, empty batch
@pytest.mark.parametrize("backend", BACKENDS)
def test_dpo_on_an_empty_batch_is_zero_with_zero_gradients(backend):
    """A mean over no pairs is 0 (the losses' documented rule), not NaN; the head gets a zero gradient."""
    W = torch.randn(8, 16, requires_grad=True)
    chosen, rejected = torch.randn(0, 4, 16, requires_grad=True), torch.randn(0, 4, 16, requires_grad=True)
    labels = torch.zeros(0, 4, dtype=torch.long)
    kwargs = dict(ref_chosen_logps=torch.zeros(0), ref_rejected_logps=torch.zeros(0))
    loss, chosen_rewards, _ = linear_dpo_loss(chosen, rejected, W, labels, labels, **kwargs, backend=backend)
    assert loss.item() == 0.0 and not torch.signbit(loss) and chosen_rewards.shape == (0,)
    loss.backward()
    assert W.grad is not None and (W.grad == 0).all()
    ref_loss = linear_dpo_loss_reference(chosen, rejected, W, labels, labels, **kwargs)[0]
    assert ref_loss.item() == 0.0


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=interpreter_only)])
def test_rope_inplace_on_a_tensor_sharing_memory_is_refused(backend):
    """q expanded over the sequence (stride 0): every position is one memory row, so no in-place rotation can be
    right; the Triton backend wrote it silently (the torch one raised torch's copy_ error)."""
    from fastft.ops.rope import rope_

    q = torch.randn(1, 2, 1, 8).expand(1, 2, 4, 8)
    k = torch.randn(1, 2, 4, 8)
    cos, sin = torch.randn(1, 4, 8), torch.randn(1, 4, 8)
    with pytest.raises(ValueError, match="`q` has elements that share memory"):
        rope_(q, k, cos, sin, backend=backend)
