"""Each Triton kernel operand read or written with its own strides, in fixed cases (the fuzz suite's few CI examples
drew these only by chance): a mutation run found an RMSNorm kernel reading the residual with x's row stride and a GLU
backward writing d_gate with dy's row stride (wrong by 4.6 and 3e9) passing every test, and five more stride mix-ups
caught by the fuzz examples alone. Every operand and every upstream gradient here has a row stride of its own; fp64
references. Also: tma_eligible refuses an unaligned base, and the fused LoRA head loss drops no rows in eval."""
import pytest
import torch
import torch.nn.functional as F

from fastft.ops.attention import attention_reference, flash_attention
from fastft.ops.glu import swiglu
from fastft.ops.rms_norm import rms_norm
from fastft.ops.rope import rope
from tests.utils import interpreter_only

pytestmark = interpreter_only
G = torch.Generator().manual_seed(0)


def _randn(*shape):
    return torch.randn(*shape, generator=G)


def _cols(rows, n, extra):
    """(rows, n) as a column slice of a wider tensor: row stride n + extra."""
    return _randn(rows, n + extra)[:, :n]


def _close(out, ref, what):
    err = (out.double() - ref).abs().max().item()
    assert err <= 1e-5 * (1 + ref.abs().max().item()), f"{what}: max error {err:.3g}"


def test_rms_norm_residual_x_dy_dh_of_different_row_strides():
    M, N, eps = 6, 40, 1e-6
    x = _cols(M, N, 3).requires_grad_()
    res = _cols(M, N, 7).requires_grad_()
    w = _randn(N).requires_grad_()
    dy, dh = _cols(M, N, 5), _cols(M, N, 1)
    y, h = rms_norm(x, w, eps, residual=res, backend="triton")
    torch.autograd.backward((y, h), (dy, dh))
    xd, rd, wd = (t.detach().double().requires_grad_() for t in (x, res, w))
    hd = xd + rd
    yd = wd * hd * torch.rsqrt(hd.pow(2).mean(-1, keepdim=True) + eps)
    torch.autograd.backward((yd, hd), (dy.double(), dh.double()))
    for name, out, ref in (("y", y, yd), ("h", h, hd), ("dx", x.grad, xd.grad), ("dresidual", res.grad, rd.grad),
                           ("dw", w.grad, wd.grad)):
        _close(out.detach(), ref.detach(), name)


def test_swiglu_gate_up_and_dy_of_different_row_strides():
    M, N = 5, 24
    gate = _cols(M, N, 3).requires_grad_()
    up = _cols(M, N, 9).requires_grad_()
    y = swiglu(gate, up, backend="triton")
    cot = _randn(M, N + 8)
    (torch.cat([y, _randn(M, 8)], dim=-1) * cot).sum().backward()  # cat's backward: dy a column slice, stride 32
    g, u = (t.detach().double().requires_grad_() for t in (gate, up))
    yd = F.silu(g) * u
    yd.backward(cot[:, :N].double())
    _close(y.detach(), yd.detach(), "y")
    _close(gate.grad, g.grad, "d_gate")
    _close(up.grad, u.grad, "d_up")


def test_rope_q_k_and_outputs_of_different_layouts():
    B, S, H, KV, D = 2, 7, 3, 2, 16
    q = _randn(B, S, H, D + 4)[..., :D].transpose(1, 2).requires_grad_()  # not dense: outputs laid out anew
    k = _randn(B, KV, S, D + 4)[..., :D].requires_grad_()
    pos = torch.arange(S)
    inv = 1.0 / (10000 ** (torch.arange(0, D, 2).float() / D))
    freqs = torch.cat([pos[:, None] * inv, pos[:, None] * inv], -1)
    cos, sin = freqs.cos()[None].expand(B, S, D), freqs.sin()[None].expand(B, S, D)
    qo, ko = rope(q, k, cos, sin, backend="triton")
    dq, dk = _randn(B, S, H, D).transpose(1, 2), _randn(B, KV, S, D + 2)[..., :D]
    torch.autograd.backward((qo, ko), (dq, dk))

    def rot(t):
        return torch.cat([-t[..., D // 2:], t[..., :D // 2]], -1)

    qd, kd = (t.detach().double().requires_grad_() for t in (q, k))
    c, s = cos.double()[:, None], sin.double()[:, None]
    qr, kr = qd * c + rot(qd) * s, kd * c + rot(kd) * s
    torch.autograd.backward((qr, kr), (dq.double(), dk.double()))
    for name, out, ref in (("q_out", qo, qr), ("k_out", ko, kr), ("dq", q.grad, qd.grad), ("dk", k.grad, kd.grad)):
        _close(out.detach(), ref.detach(), name)


@pytest.mark.parametrize("causal,prefix", [(False, False), (True, False), (True, True)])
def test_attention_q_k_v_prefix_and_do_of_different_strides(causal, prefix):
    B, S, H, KV, D, P = 1, 19, 2, 1, 16, 3
    q = _randn(B, S, H, D).requires_grad_()
    k = _randn(B, S, KV + 2, D)[:, :, 1:1 + KV].requires_grad_()  # a slice of a packed qkv-like tensor
    v = _randn(B, KV, S, D).transpose(1, 2).requires_grad_()  # (B, S, KV, D) with its sequence stride D
    pk = _randn(B, P, KV, D + 8)[..., :D].requires_grad_() if prefix else None
    pv = _randn(B, KV, P, D).transpose(1, 2).requires_grad_() if prefix else None
    o = flash_attention(q, k, v, causal=causal, prefix_k=pk, prefix_v=pv, backend="triton")
    do = _randn(B, H, S, D).transpose(1, 2)
    o.backward(do)
    leaves = [t for t in (q, k, v, pk, pv) if t is not None]
    doubles = [t.detach().double().requires_grad_() for t in leaves]
    od = attention_reference(*doubles[:3], causal=causal, prefix_k=doubles[3] if prefix else None,
                             prefix_v=doubles[4] if prefix else None)
    od.backward(do.double())
    _close(o.detach(), od.detach(), "o")
    for name, ours, ref in zip(("dq", "dk", "dv", "dprefix_k", "dprefix_v"), leaves, doubles):
        _close(ours.grad, ref.grad, name)


def test_tma_eligible_refuses_a_base_not_16_byte_aligned():
    from fastft.kernels.attention import tma_eligible

    aligned = torch.randn(2 * 16 * 4 * 64 + 4)
    assert tma_eligible(64, aligned[:-4].view(2, 16, 4, 64))
    shifted = aligned[1:-3].view(2, 16, 4, 64)  # 4 bytes past the aligned base
    assert shifted.data_ptr() % 16 and not tma_eligible(64, shifted)


def test_fused_lora_head_loss_in_eval_has_no_dropout():
    import peft

    from fastft.ops.linear_losses import lm_head_cross_entropy

    class Head(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lm_head = torch.nn.Linear(16, 40, bias=False)

        def forward(self, h):
            return self.lm_head(h)

    model = peft.get_peft_model(Head(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["lm_head"],
                                                         lora_dropout=0.5, init_lora_weights=False))
    head = model.base_model.model.lm_head
    hidden, labels = _randn(12, 16), torch.randint(0, 40, (12,), generator=G)
    head.eval()
    want = F.cross_entropy(head(hidden).double(), labels)
    got = lm_head_cross_entropy(hidden, head, labels, backend="torch")
    assert abs(got.item() - want.item()) < 1e-5
    head.train()  # and dropout is really there in training (the comparison above could not pass by accident)
    assert abs(lm_head_cross_entropy(hidden, head, labels, backend="torch").item() - want.item()) > 1e-3
