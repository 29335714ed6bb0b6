"""The fused ops' outputs take in-place changes as torch's own ops' do (`ReLU(inplace=True)` after a LoRA linear,
Mixtral's `hidden_states *= jitter` on the RMSNorm output in training). An autograd.Function that returned a view
it made of its result (`y.view(*x.shape[:-1], N)`) made autograd refuse any in-place op on it: the Triton backend,
the GPU default, failed where the torch backend and peft ran. Each case: the op's output changed in place, then
backward, against the reference op under the same change. Small sizes: the kernels run through the interpreter."""
from __future__ import annotations

import pytest
import torch

from fastft.ops import (dora_linear, dora_linear_reference, geglu, ia3_linear, ia3_linear_reference, lora_linear,
                        lora_linear_reference, nf4_linear, qlora_linear, swiglu)
from fastft.ops.bottleneck_adapter import bottleneck_adapter, bottleneck_adapter_reference
from fastft.ops.glu import geglu_reference, swiglu_reference
from fastft.ops.qlora import nf4_linear_reference, qlora_linear_reference
from fastft.ops.rms_norm import rms_norm, rms_norm_reference
from fastft.ops.rope import rope, rope_reference
from fastft.quant import quantize_nf4
from tests.utils import INTERPRET, assert_close

BACKENDS = ["torch"] + (["triton"] if INTERPRET else [])
K, N, R = 40, 24, 4


def operands(seed: int = 0, device: str = "cpu"):
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device).requires_grad_()

    return dict(x=randn(2, 5, K), w=(torch.randn(N, K, generator=g) / K ** 0.5).to(device), b=randn(N),
                A=randn(R, K, scale=0.3), B=randn(N, R, scale=0.3),
                m=(torch.rand(N, generator=g) + 0.5).to(device).requires_grad_(), l_out=randn(N, 1), l_in=randn(1, K),
                D=randn(8, K, scale=0.3), db=randn(8), U=randn(K, 8, scale=0.3), ub=randn(K),
                qw=quantize_nf4(torch.randn(N, 64, generator=torch.Generator().manual_seed(3)), blocksize=64).to(device))


CASES = {  # name: (fused op, reference op), each a function of (operands, backend) -> output
    "lora_linear": lambda o, be: (lora_linear if be else lora_linear_reference)(
        o["x"], o["w"], o["b"], o["A"], o["B"], 2.0, **({"backend": be} if be else {})),
    "dora_linear": lambda o, be: (dora_linear if be else dora_linear_reference)(
        o["x"], o["w"], o["b"], o["A"], o["B"], o["m"], 2.0, **({"backend": be} if be else {})),
    "dora_linear_no_bias": lambda o, be: (dora_linear if be else dora_linear_reference)(
        o["x"], o["w"], None, o["A"], o["B"], o["m"], 2.0, **({"backend": be} if be else {})),
    "ia3_output": lambda o, be: (ia3_linear(o["x"], o["w"], o["b"], o["l_out"], feedforward=False, backend=be) if be
                                 else ia3_linear_reference(o["x"], o["w"], o["b"], o["l_out"], False)),
    "ia3_output_no_bias": lambda o, be: (
        ia3_linear(o["x"], o["w"], None, o["l_out"], feedforward=False, backend=be) if be
        else ia3_linear_reference(o["x"], o["w"], None, o["l_out"], False)),
    "ia3_feedforward": lambda o, be: (ia3_linear(o["x"], o["w"], o["b"], o["l_in"], feedforward=True, backend=be) if be
                                      else ia3_linear_reference(o["x"], o["w"], o["b"], o["l_in"], True)),
    "bottleneck_adapter": lambda o, be: (bottleneck_adapter if be else bottleneck_adapter_reference)(
        o["x"], o["D"], o["db"], o["U"], o["ub"], "silu", **({"backend": be} if be else {})),
    "swiglu": lambda o, be: swiglu(o["x"], o["x"] * 0.5, backend=be) if be else swiglu_reference(o["x"], o["x"] * 0.5),
    "geglu": lambda o, be: geglu(o["x"], o["x"] * 0.5, backend=be) if be else geglu_reference(o["x"], o["x"] * 0.5),
    "rms_norm": lambda o, be: (rms_norm(o["x"], o["ub"], backend=be) if be else rms_norm_reference(o["x"], o["ub"],
                                                                                                   1e-6)),
    "rms_norm_residual": lambda o, be: (rms_norm(o["x"], o["ub"], residual=o["x"] * 2, backend=be) if be
                                        else rms_norm_reference(o["x"], o["ub"], 1e-6, residual=o["x"] * 2)),
    "qlora_linear": lambda o, be: (qlora_linear if be else qlora_linear_reference)(
        torch.cat([o["x"], o["x"][..., :24]], -1), o["qw"], o["b"], o["A"].repeat(1, 2)[:, :64], o["B"], 2.0,
        **({"backend": be} if be else {})),
    "nf4_linear": lambda o, be: (nf4_linear(torch.cat([o["x"], o["x"][..., :24]], -1), o["qw"], o["b"], backend=be)
                                 if be else nf4_linear_reference(torch.cat([o["x"], o["x"][..., :24]], -1), o["qw"],
                                                                 o["b"])),
}


def changed_in_place(out, changed: int = 2):
    """The first `changed` outputs changed in place (as ReLU(inplace=True), `*=` would), then all summed with
    weights. (rms_norm's second output, the residual sum h, is what backward reads: changing it is an error in
    torch too.)"""
    outs = out if isinstance(out, tuple) else (out,)
    total = 0
    for i, t in enumerate(outs):
        if i < changed:
            t.mul_(1.5).add_(0.25)
        total = total + (t * torch.linspace(-1, 1, t.shape[-1], device=t.device)).sum() * (i + 1)
    return total


def grads_after(case, backend, device="cpu"):
    o = operands(device=device)
    changed_in_place(CASES[case](o, backend), changed=1 if case == "rms_norm_residual" else 2).backward()
    return {k: v.grad for k, v in o.items() if isinstance(v, torch.Tensor) and v.grad is not None}


@pytest.mark.gpu
@pytest.mark.parametrize("case", sorted(CASES))
def test_output_changed_in_place_then_backward_on_cuda(case):
    if case in SAVES_OUTPUT:
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            grads_after(case, "triton", "cuda")
        return
    expected, got = grads_after(case, None, "cuda"), grads_after(case, "triton", "cuda")
    assert set(got) == set(expected) and got, case
    for name, g in expected.items():
        assert_close(got[name], g, torch.float32, f"{case} cuda: grad {name}")


# fused paths whose backward reads their own output (IA3 scaling the output, DoRA without a bias): changing it in
# place is autograd's error, as for torch's ops that save their output (sigmoid, exp), never a silent wrong gradient
SAVES_OUTPUT = {"ia3_output", "ia3_output_no_bias", "dora_linear_no_bias"}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_output_changed_in_place_then_backward(case, backend):
    if backend == "triton" and case in SAVES_OUTPUT:
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            grads_after(case, backend)
        return
    expected = grads_after(case, None)
    got = grads_after(case, backend)
    assert set(got) == set(expected) and got, case
    for name, g in expected.items():
        assert_close(got[name], g, torch.float32, f"{case} {backend}: grad {name}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_rope_outputs_changed_in_place(backend):
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 4, 6, 16, generator=g).requires_grad_()
    k = torch.randn(2, 2, 6, 16, generator=g).requires_grad_()
    angles = torch.randn(2, 6, 8, generator=g)
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    grads = []
    for op in (rope_reference, lambda *a: rope(*a, backend=backend)):
        q.grad = k.grad = None
        changed_in_place(op(q, k, cos, sin)).backward()
        grads.append((q.grad, k.grad))
    assert_close(grads[1][0], grads[0][0], torch.float32, "dq")
    assert_close(grads[1][1], grads[0][1], torch.float32, "dk")


def test_nf4_torch_backend_gives_higher_order_gradients():
    """backend="torch" gives higher-order gradients (DEVELOPERS.md); qlora_linear / nf4_linear refused them there
    with a message about Triton kernels their torch backward does not run (an input-gradient penalty on a QLoRA
    model on the CPU could not be trained)."""
    g = torch.Generator().manual_seed(0)
    qw = quantize_nf4(torch.randn(8, 64, generator=g), blocksize=64)
    dense = qw.dequantize(torch.float32)
    x = torch.randn(2, 3, 64, generator=g).requires_grad_()
    A, B = torch.randn(2, 64, generator=g).requires_grad_(), torch.randn(8, 2, generator=g).requires_grad_()
    bias = torch.randn(8, generator=g).requires_grad_()

    def penalty_grads(forward):
        (gx,) = torch.autograd.grad(torch.tanh(forward()).sum(), x, create_graph=True)
        return torch.autograd.grad(gx.square().sum(), (x, A, B))

    expected = penalty_grads(lambda: qlora_linear_reference(x, qw, bias, A, B, 2.0))
    reference_dense = penalty_grads(lambda: torch.nn.functional.linear(x, dense, bias) + 2.0 * (x @ A.t()) @ B.t())
    for e, d in zip(expected, reference_dense):
        torch.testing.assert_close(e, d)
    for got, want in zip(penalty_grads(lambda: qlora_linear(x, qw, bias, A, B, 2.0, backend="torch")), expected):
        torch.testing.assert_close(got, want)
    (gx,) = torch.autograd.grad(torch.tanh(nf4_linear(x, qw, bias, backend="torch")).sum(), x, create_graph=True)
    (gx_ref,) = torch.autograd.grad(torch.tanh(torch.nn.functional.linear(x, dense, bias)).sum(), x, create_graph=True)
    torch.testing.assert_close(torch.autograd.grad(gx.square().sum(), x)[0],
                               torch.autograd.grad(gx_ref.square().sum(), x)[0])


@pytest.mark.skipif(not INTERPRET, reason="the Triton backend on CPU needs the interpreter")
def test_patched_mixtral_with_router_jitter_trains():
    """Mixtral's MoE block multiplies the post-attention RMSNorm output in place when router_jitter_noise > 0 (in
    training): a patched model on the Triton backend failed at its first step. Two experts a token: with one,
    its renormalised weight is exactly 1 and the router's gradient rounding noise (~1e-9, compared relatively)."""
    import copy

    from transformers import MixtralConfig, MixtralForCausalLM

    import fastft

    torch.manual_seed(0)
    config = MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2, num_key_value_heads=1, num_local_experts=3, num_experts_per_tok=2,
                           router_jitter_noise=0.1, max_position_embeddings=64)
    reference = MixtralForCausalLM(config).train()
    patched = fastft.patch_model(copy.deepcopy(reference), backend="triton", attention=False)
    ids = torch.randint(0, 64, (1, 8), generator=torch.Generator().manual_seed(1))
    results = []
    for model in (reference, patched):
        torch.manual_seed(2)  # the same jitter draw
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    assert_close(results[1][0], results[0][0], torch.float32, "loss")
    for name, g in results[0][1].items():
        assert_close(results[1][1][name], g, torch.float32, f"grad {name}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_one_dimensional_input_gives_a_one_dimensional_output(backend):
    """F.linear maps (K,) to (N,); dora_linear's torch path gave (1, N) (its σ broadcast as a (1, N) row)."""
    o = operands()
    x = o["x"][0, 0]
    for case, out in (("dora", dora_linear(x, o["w"], o["b"], o["A"], o["B"], o["m"], 2.0, backend=backend)),
                      ("lora", lora_linear(x, o["w"], o["b"], o["A"], o["B"], 2.0, backend=backend)),
                      ("ia3", ia3_linear(x, o["w"], o["b"], o["l_out"], feedforward=False, backend=backend))):
        assert out.shape == (N,), case
