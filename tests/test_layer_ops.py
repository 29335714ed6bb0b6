"""RMSNorm (+ residual), RoPE (q and k, in place or not) and SwiGLU/GeGLU: Triton kernels (through the
interpreter on CPU) against fp64 references, forward and every gradient, fuzzed odd shapes, non-contiguous
inputs, fp32/fp16/bf16; argument checks; transformers' own modules as the rounding reference."""
import random

import pytest
import torch

from fastft.ops import geglu, geglu_reference, rms_norm, rms_norm_reference, rope, rope_, rope_cos_sin, \
    rope_reference, swiglu, swiglu_reference
from tests.utils import TOL, assert_close, interpreter_only, rel_err

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _grads(out, inputs, cot):
    outs = out if isinstance(out, tuple) else (out,)
    total = sum((o.double() * c).sum() for o, c in zip(outs, cot))
    return torch.autograd.grad(total, inputs)


def _cot(refs, dtype):
    """Cotangents exactly representable in dtype, so the test does not measure the rounding of dy itself."""
    return [torch.randn_like(r).to(dtype).double() for r in refs]


def _leaf(t, dtype):
    return t.to(dtype).detach().requires_grad_()


def _wide(shape, dtype, extra=3):
    """A tensor with a row stride wider than its last dimension (a column slice of a bigger one)."""
    big = torch.randn(*shape[:-1], shape[-1] + extra, device=DEVICE, dtype=dtype)
    return big[..., : shape[-1]]


# ---------------------------------------------------------------------------------------------- RMSNorm
def _rms_cases():
    rng = random.Random(7)
    cases = []
    for i, dtype in enumerate(DTYPES * 3):
        shape = (rng.choice([1, 2, 3]), rng.randint(1, 41), rng.choice([1, 17, 64, 100, 257]))
        cases.append((dtype, shape, [0.0, 1.0][i % 2], i % 3 == 0, i % 4 == 1, i % 5 == 2))
    return cases


@interpreter_only
@pytest.mark.parametrize("dtype,shape,offset,with_residual,strided,fp32_weight", _rms_cases())
def test_rms_norm_matches_fp64(dtype, shape, offset, with_residual, strided, fp32_weight):
    x = _wide(shape, dtype) if strided else torch.randn(shape, device=DEVICE, dtype=dtype)
    x = x.requires_grad_()
    w = _leaf(torch.randn(shape[-1], device=DEVICE) * 0.5 + (1 - offset), torch.float32 if fp32_weight else dtype)
    res = _leaf(torch.randn(shape, device=DEVICE), dtype) if with_residual else None
    out = rms_norm(x, w, 1e-5, offset=offset, residual=res, backend="triton")
    inputs = (x, w) + ((res,) if with_residual else ())
    ref = rms_norm_reference(*(t.double() for t in (x, w)), 1e-5, offset=offset,
                             residual=res.double() if with_residual else None)
    outs, refs = (out, ref) if with_residual else ((out,), (ref,))
    expect_dtype = torch.promote_types(dtype, w.dtype) if offset == 0.0 else dtype
    assert outs[0].dtype == expect_dtype
    for o, r, what in zip(outs, refs, ("y", "h")):
        assert_close(o, r, dtype, f"rms_norm {what}")
    cot = _cot(refs, dtype)
    got = _grads(outs, inputs, cot)
    want = torch.autograd.grad(sum((r * c).sum() for r, c in zip(refs, cot)), inputs)
    for g, r, t, name in zip(got, want, inputs, ("dx", "dw", "dresidual")):
        assert g.dtype == t.dtype, name
        assert_close(g, r, dtype, f"rms_norm {name}")


@interpreter_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_rounds_like_transformers(dtype):
    """Llama rounds x̂ to the input dtype before ·w; Gemma multiplies in fp32: the kernel does each, so it sits
    within a rounding of transformers' modules (far inside the fp64 tolerance)."""
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    x = torch.randn(3, 29, 96, device=DEVICE, dtype=dtype) * 3
    for module, offset in ((LlamaRMSNorm(96, eps=1e-6), 0.0), (Gemma3RMSNorm(96, eps=1e-6), 1.0)):
        with torch.no_grad():
            module.weight.copy_(torch.randn(96) * 0.3)
        module = module.to(DEVICE, dtype)
        want = module(x)
        got = rms_norm(x, module.weight, 1e-6, offset=offset, backend="triton")
        assert got.dtype == want.dtype
        assert rel_err(got, want) <= TOL[dtype] / 4, type(module).__name__


@interpreter_only
def test_rms_norm_without_weight_grad_and_under_autocast():
    x = torch.randn(5, 33, device=DEVICE, requires_grad=True)
    w = torch.randn(33, device=DEVICE)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        y = rms_norm(x, w, 1e-6, backend="triton")
    assert y.dtype == torch.float32  # as transformers' norm under autocast: no autocast op inside
    (dx,) = torch.autograd.grad(y.sum(), x)
    xd = x.detach().double().requires_grad_()
    (dx_ref,) = torch.autograd.grad(rms_norm_reference(xd, w.double(), 1e-6).sum(), xd)
    assert_close(dx, dx_ref, torch.float32, "dx")


def test_rms_norm_validation():
    x, w = torch.randn(4, 8), torch.randn(8)
    with pytest.raises(ValueError, match="`weight` must have shape \\(8,\\)"):
        rms_norm(x, torch.randn(7), 1e-6)
    with pytest.raises(ValueError, match="`eps` must be a non-negative number"):
        rms_norm(x, w, -1e-6)
    with pytest.raises(ValueError, match="`residual` must have x's shape"):
        rms_norm(x, w, 1e-6, residual=torch.randn(4, 9))
    with pytest.raises(ValueError, match="`residual` is torch.float16"):
        rms_norm(x, w, 1e-6, residual=torch.randn(4, 8, dtype=torch.float16))
    with pytest.raises(ValueError, match="`cast` must be one of"):
        rms_norm(x, w, 1e-6, cast="bf16")
    with pytest.raises(ValueError, match="`x` must be a floating-point tensor"):
        rms_norm(torch.ones(4, 8, dtype=torch.long), w, 1e-6)
    with pytest.raises(ValueError, match="`backend` must be one of"):
        rms_norm(x, w, 1e-6, backend="cuda")


# ------------------------------------------------------------------------------------------------- RoPE
def _inv_freq(head_dim):
    return 1.0 / (10000 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))


def _qk(B, S, HQ, HK, D, dtype, layout):
    """q/k as transformers makes them: (B, H, S, D) transpose views of (B, S, H·D) projections ("view"),
    contiguous (B, H, S, D) ("bhsd"), or (B, S, H, D) with unsqueeze_dim=2 ("bshd")."""
    if layout == "view":
        q = torch.randn(B, S, HQ * D, device=DEVICE, dtype=dtype).view(B, S, HQ, D).transpose(1, 2)
        k = torch.randn(B, S, HK * D, device=DEVICE, dtype=dtype).view(B, S, HK, D).transpose(1, 2)
    elif layout == "bhsd":
        q, k = (torch.randn(B, H, S, D, device=DEVICE, dtype=dtype) for H in (HQ, HK))
    else:
        q, k = (torch.randn(B, S, H, D, device=DEVICE, dtype=dtype) for H in (HQ, HK))
    return q, k


def _positions(B, S, packed):
    if not packed:
        return torch.arange(S, device=DEVICE).expand(B, S)
    # one packed row per batch entry: documents whose positions restart at 0
    cuts = sorted({0, S // 3, S // 3 + 2, S})
    pos = torch.cat([torch.arange(b - a, device=DEVICE) for a, b in zip(cuts, cuts[1:])])
    return pos.expand(B, S)


ROPE_CASES = [
    (torch.float32, 2, 37, 4, 2, 16, "view", False),
    (torch.float16, 1, 19, 3, 1, 24, "bhsd", True),
    (torch.bfloat16, 3, 11, 2, 2, 8, "bshd", False),
    (torch.float32, 1, 33, 6, 2, 32, "bshd", True),
    (torch.bfloat16, 2, 7, 5, 1, 16, "view", True),
]


@interpreter_only
@pytest.mark.parametrize("dtype,B,S,HQ,HK,D,layout,packed", ROPE_CASES)
@pytest.mark.parametrize("inplace", [False, True])
def test_rope_matches_fp64(dtype, B, S, HQ, HK, D, layout, packed, inplace):
    unsqueeze_dim = 2 if layout == "bshd" else 1
    q0, k0 = _qk(B, S, HQ, HK, D, dtype, layout)
    pos = _positions(B, S, packed)
    cos, sin = rope_cos_sin(pos, _inv_freq(D), 1.0, dtype)
    if packed:  # the rotary embedding broadcasts one row of positions: exercise the (1, S, D) case
        cos, sin = cos[:1], sin[:1]
    q_leaf, k_leaf = q0.detach().clone().requires_grad_(), k0.detach().clone().requires_grad_()
    # in place needs non-leaf inputs: apply to (leaf * 1) views keeping the layout's strides
    q_in, k_in = (q_leaf * 1, k_leaf * 1) if inplace else (q_leaf, k_leaf)
    fn = rope_ if inplace else rope
    q_out, k_out = fn(q_in, k_in, cos, sin, unsqueeze_dim=unsqueeze_dim, backend="triton")
    if inplace:
        assert q_out.data_ptr() == q_in.data_ptr() and k_out.data_ptr() == k_in.data_ptr()
    else:
        assert q_out.stride() == q_leaf.stride()
    q_ref, k_ref = rope_reference(q0.double(), k0.double(), cos.double(), sin.double(), unsqueeze_dim=unsqueeze_dim)
    assert_close(q_out, q_ref, dtype, "rope q")
    assert_close(k_out, k_ref, dtype, "rope k")
    cot = _cot((q_ref, k_ref), dtype)
    got = _grads((q_out, k_out), (q_leaf, k_leaf), cot)
    qd, kd = q0.double().requires_grad_(), k0.double().requires_grad_()
    want = _grads(rope_reference(qd, kd, cos.double(), sin.double(), unsqueeze_dim=unsqueeze_dim), (qd, kd), cot)
    for g, r, name in zip(got, want, ("dq", "dk")):
        assert_close(g, r, dtype, f"rope {name}")


@interpreter_only
@pytest.mark.parametrize("grad", [True, False])
def test_rope_inplace_on_transformers_views(grad):
    """In place on (B, H, S, D) transpose views of projection outputs (what transformers' attention holds),
    with and without autograd; gradients reach the projections' inputs."""
    x = torch.randn(2, 9, 32, device=DEVICE, requires_grad=grad)
    w_q, w_k = torch.randn(64, 32, device=DEVICE), torch.randn(32, 32, device=DEVICE)
    cos, sin = rope_cos_sin(_positions(2, 9, packed=True), _inv_freq(16))

    def attention_inputs(fn):
        q = (x @ w_q.t()).view(2, 9, 4, 16).transpose(1, 2)
        k = (x @ w_k.t()).view(2, 9, 2, 16).transpose(1, 2)
        out = fn(q, k)
        return out, q, k

    (q_out, k_out), q, k = attention_inputs(lambda q, k: rope_(q, k, cos, sin, backend="triton"))
    assert q_out is q and k_out is k
    (q_ref, k_ref), _, _ = attention_inputs(lambda q, k: rope_reference(q, k, cos, sin))
    assert rel_err(q_out, q_ref) < 1e-6 and rel_err(k_out, k_ref) < 1e-6
    if grad:
        (dx,) = torch.autograd.grad((q_out.sum(-1) ** 2).sum() + (k_out ** 3).sum(), x)
        (dx_ref,) = torch.autograd.grad((q_ref.sum(-1) ** 2).sum() + (k_ref ** 3).sum(), x)
        assert rel_err(dx, dx_ref) < 1e-5


@interpreter_only
def test_rope_from_position_ids_equals_cos_sin():
    q, k = _qk(2, 13, 4, 2, 16, torch.float32, "view")
    pos = _positions(2, 13, packed=True)
    cos, sin = rope_cos_sin(pos, _inv_freq(16))
    a = rope(q, k, cos, sin, backend="triton")
    b = rope(q, k, position_ids=pos, inv_freq=_inv_freq(16), backend="triton")
    assert all(torch.equal(x, y) for x, y in zip(a, b))


@interpreter_only
@pytest.mark.parametrize("layout", ["view", "bshd"])
def test_rope_tables_of_different_strides_and_batches(layout):
    """The kernel reads cos and sin with one set of strides: tables that differ there (a batch-1 table beside a
    per-batch one, a strided slice) are copied to one layout first; results equal those of plain tables."""
    unsqueeze_dim = 2 if layout == "bshd" else 1
    q, k = _qk(2, 9, 3, 1, 16, torch.float32, layout)
    cos, sin = rope_cos_sin(_positions(2, 9, packed=False), _inv_freq(16))
    strided_sin = torch.stack([sin, sin], dim=-1).flatten(-2)[..., ::2]  # sin's values, last stride 2
    for c, s in ((cos[:1], sin), (cos, strided_sin), (cos[:1], sin[:1])):
        want = rope(q, k, c.expand(2, 9, 16).contiguous(), s.expand(2, 9, 16).contiguous(),
                    unsqueeze_dim=unsqueeze_dim, backend="triton")
        got = rope(q, k, c, s, unsqueeze_dim=unsqueeze_dim, backend="triton")
        assert all(torch.equal(g, w) for g, w in zip(got, want))
        ref = rope_reference(q.double(), k.double(), c.double(), s.double(), unsqueeze_dim=unsqueeze_dim)
        assert rel_err(got[0], ref[0]) < 1e-6 and rel_err(got[1], ref[1]) < 1e-6


@interpreter_only
def test_rope_matches_transformers_rotary_embedding():
    """cos/sin from LlamaRotaryEmbedding (packed positions) through the kernel = apply_rotary_pos_emb."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    config = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    q, k = _qk(1, 21, 4, 2, 16, torch.float32, "view")
    pos = _positions(1, 21, packed=True)
    cos, sin = LlamaRotaryEmbedding(config)(q, pos)
    want = apply_rotary_pos_emb(q, k, cos, sin)
    got = rope(q, k, cos, sin, backend="triton")
    for g, w in zip(got, want):
        assert rel_err(g, w) < 1e-6


def test_rope_validation():
    q, k = _qk(1, 5, 2, 1, 8, torch.float32, "bhsd")
    cos, sin = rope_cos_sin(torch.arange(5)[None], _inv_freq(8))
    with pytest.raises(ValueError, match="`cos` must have shape"):
        rope(q, k, cos[:, :4], sin)
    with pytest.raises(ValueError, match="head dimension must be even"):
        rope(torch.randn(1, 2, 5, 7), torch.randn(1, 1, 5, 7), torch.randn(1, 5, 7), torch.randn(1, 5, 7))
    with pytest.raises(ValueError, match="`k` .* must match `q`"):
        rope(q, torch.randn(1, 1, 6, 8), cos, sin)
    with pytest.raises(ValueError, match="`unsqueeze_dim` must be 1"):
        rope(q, k, cos, sin, unsqueeze_dim=3)
    with pytest.raises(ValueError, match="either `cos`/`sin` or `position_ids`"):
        rope(q, k, cos, sin, position_ids=torch.arange(5)[None], inv_freq=_inv_freq(8))
    with pytest.raises(ValueError, match="needs `inv_freq`"):
        rope(q, k, position_ids=torch.arange(5)[None])
    with pytest.raises(ValueError, match="`q` is torch.float32 but `k` is torch.float16"):
        rope(q, k.half(), cos, sin)


# -------------------------------------------------------------------------------------------------- GLU
def _glu_cases():
    rng = random.Random(11)
    return [(dtype, gelu, (rng.randint(1, 5), rng.randint(1, 23), rng.choice([1, 31, 96, 300, 1100])), i % 2 == 0)
            for i, (dtype, gelu) in enumerate([(d, g) for d in DTYPES for g in (False, True)])]


@interpreter_only
@pytest.mark.parametrize("dtype,gelu,shape,fused_input", _glu_cases())
def test_glu_matches_fp64(dtype, gelu, shape, fused_input):
    if fused_input:  # gate and up as halves of one fused gate_up projection: row stride 2N
        gu = torch.randn(*shape[:-1], 2 * shape[-1], device=DEVICE, dtype=dtype).requires_grad_()
        gate, up = gu[..., : shape[-1]], gu[..., shape[-1]:]
        leaves = (gu,)
    else:
        gate, up = (torch.randn(shape, device=DEVICE, dtype=dtype).requires_grad_() for _ in range(2))
        leaves = (gate, up)
    op, ref = (geglu, geglu_reference) if gelu else (swiglu, swiglu_reference)
    y = op(gate, up, backend="triton")
    assert y.dtype == dtype and y.shape == gate.shape
    doubles = [t.detach().double().requires_grad_() for t in leaves]
    g_d, u_d = (doubles[0][..., : shape[-1]], doubles[0][..., shape[-1]:]) if fused_input else doubles
    y_ref = ref(g_d, u_d)
    assert_close(y, y_ref, dtype, "glu y")
    cot = _cot([y_ref], dtype)
    for g, r in zip(_grads(y, leaves, cot), _grads(y_ref, doubles, cot)):
        assert_close(g, r, dtype, "glu grad")


@interpreter_only
def test_geglu_gradient_is_finite_at_huge_gates():
    """gelu'(x) has an x·u' term (u' ~ x²) that overflows fp32 past |x| ~ 1e13, where it multiplies an exact 0:
    the Triton backward gave NaN there, and torch does past ~2e19. The derivative is 0 below and 1 above."""
    gate = torch.tensor([-3e38, -1e20, -1e14, -3e13, -20.0, 20.0, 3e13, 1e20, 3e38], requires_grad=True)
    up = torch.full_like(gate, 0.5, requires_grad=True)
    y = geglu(gate, up, backend="triton")
    d_gate, d_up = torch.autograd.grad(y, (gate, up), torch.ones_like(y))
    gelu = torch.where(gate > 0, gate, 0.0).detach()  # exact in fp32 at these |x|
    assert torch.equal(d_gate, (gate > 0).float() * 0.5)
    assert torch.equal(d_up, gelu) and torch.equal(y, gelu * 0.5)


def test_glu_validation():
    with pytest.raises(ValueError, match="must have one shape"):
        swiglu(torch.randn(2, 3), torch.randn(2, 4))
    with pytest.raises(ValueError, match="`gate` is torch.float32 but `up` is torch.float16"):
        geglu(torch.randn(2, 3), torch.randn(2, 3, dtype=torch.float16))
    with pytest.raises(ValueError, match="`backend` must be one of"):
        swiglu(torch.randn(2, 3), torch.randn(2, 3), backend="fast")


# ---------------------------------------------------------------------------------------------- GPU only
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_layer_ops_gpu_at_model_sizes(dtype):
    """Llama-3.2-1B-sized rows on the GPU: each op against fp64, forward and gradients."""
    x = torch.randn(4 * 509, 2048, device="cuda", dtype=dtype, requires_grad=True)
    res = torch.randn_like(x, requires_grad=True)
    w = torch.randn(2048, device="cuda", dtype=dtype, requires_grad=True)
    y, h = rms_norm(x, w, 1e-5, residual=res)
    ry, rh = rms_norm_reference(x.double(), w.double(), 1e-5, residual=res.double())
    assert_close(y, ry, dtype, "rms y")
    cot = _cot((ry, rh), dtype)
    for g, r in zip(_grads((y, h), (x, w, res), cot), torch.autograd.grad(
            (ry * cot[0]).sum() + (rh * cot[1]).sum(), (x, w, res))):
        assert_close(g, r, dtype, "rms grad")
    q, k = (torch.randn(4, 509, n * 64, device="cuda", dtype=dtype).view(4, 509, n, 64).transpose(1, 2)
            .requires_grad_() for n in (32, 8))
    cos, sin = rope_cos_sin(torch.arange(509, device="cuda")[None], _inv_freq(64).cuda(), 1.0, dtype)
    qo, ko = rope(q, k, cos, sin)
    qr, kr = rope_reference(q.double(), k.double(), cos.double(), sin.double())
    assert_close(qo, qr, dtype, "rope q")
    assert_close(ko, kr, dtype, "rope k")
    gate, up = (torch.randn(4 * 509, 8192, device="cuda", dtype=dtype, requires_grad=True) for _ in range(2))
    for op, ref in ((swiglu, swiglu_reference), (geglu, geglu_reference)):
        yo = op(gate, up)
        yr = ref(gate.double(), up.double())
        assert_close(yo, yr, dtype, "glu")
        c = _cot([yr], dtype)[0]
        for g, r in zip(_grads(yo, (gate, up), [c]), torch.autograd.grad((yr * c).sum(), (gate, up))):
            assert_close(g, r, dtype, "glu grad")
