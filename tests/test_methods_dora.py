"""DoRA: the fused op (Triton through the interpreter) against an fp64 reference, the layer and model against
peft's DoRA (forward and every gradient), NF4 bases, save/load both ways with peft, and refused options."""
import random

import pytest
import torch
from peft import LoraConfig

import fastft
from fastft.integration.methods.dora import FusedDoraLinear, FusedQDoraLinear
from fastft.ops import qlora_path
from fastft.ops.dora import dora_linear, dora_linear_reference, dora_row_norm
from fastft.quant.nf4_weight import NF4Weight, quantize_nf4
from tests.methods_utils import (assert_round_trips_with_peft, assert_same_step, fastft_and_peft, ids, perturb_trainables,
                                 step, unfreeze_base_weights)
from tests.utils import ALL_LINEAR, INTERPRET, assert_close, interpreter_only, tiny_llama

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _inputs(M, K, N, r, dtype, *, bias=True, batch=()):
    x = torch.randn(*batch, M, K).to(dtype).requires_grad_()
    W = (torch.randn(N, K) * K**-0.5).to(dtype)
    b = (torch.randn(N) * 0.1).to(dtype).requires_grad_() if bias else None
    A = (torch.randn(r, K) * K**-0.5).requires_grad_()
    B = (torch.randn(N, r) * 0.3).requires_grad_()
    m = (torch.rand(N) + 0.5).requires_grad_()
    return x, W, b, A, B, m


def _fp64_reference(x, W, b, A, B, m, s, dy):
    leaves = {k: v.detach().double().requires_grad_(v.requires_grad)
              for k, v in dict(x=x, b=b, A=A, B=B, m=m).items() if v is not None}
    Wd = W.dequantize(torch.float32).double() if isinstance(W, NF4Weight) else W.double()
    y = dora_linear_reference(leaves["x"], Wd, leaves.get("b"), leaves["A"], leaves["B"], leaves["m"], s)
    y.backward(dy.double())
    return y, {k: v.grad for k, v in leaves.items()}


def _check(x, W, b, A, B, m, s=0.7):
    dtype = x.dtype
    y = dora_linear(x, W, b, A, B, m, s, backend="triton")
    assert y.dtype == dtype and y.shape == (*x.shape[:-1], W.shape[0])
    dy = torch.randn_like(y)
    y.backward(dy)
    y_ref, grads = _fp64_reference(x, W, b, A, B, m, s, dy)
    assert_close(y, y_ref, dtype, "y")
    got = dict(x=x, b=b, A=A, B=B, m=m)
    for name, ref in grads.items():
        assert got[name].grad is not None and got[name].grad.dtype == got[name].dtype, f"d{name}"
        # adapter gradients are fp32 tensors computed from x-dtype operands: the x dtype's tolerance
        assert_close(got[name].grad, ref, dtype, f"d{name}")


@interpreter_only
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", range(3))
def test_fused_op_fuzzed_shapes_forward_and_grads(dtype, case):
    rng = random.Random(100 * case + DTYPES.index(dtype))
    M, N, r = rng.choice([1, 7, 37, 70]), rng.choice([16, 33, 80]), rng.choice([1, 4, 8, 17])
    K = rng.choice([16, 37, 64]) if dtype == torch.float32 else rng.choice([16, 40, 64])
    _check(*_inputs(M, K, N, r, dtype, bias=case != 1, batch=(2,) if case == 2 else ()))


@interpreter_only
def test_fused_op_non_contiguous_input():
    x, W, b, A, B, m = _inputs(20, 48, 24, 4, torch.float32)
    x_nc = torch.randn(48, 20).t().requires_grad_()  # column-major rows
    _check(x_nc, W, b, A, B, m)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=interpreter_only)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_row_norm_matches_fp64(backend, dtype):
    """Both backends against ‖W + s·B·A‖ in fp64, ragged N and K, a transposed W, and rows that cancel: W = −s·B·A
    + a tiny residual, where the old expansion ‖W‖² + 2s·ΣB∘(W·Aᵀ) + s²·B(AAᵀ)Bᵀ came out 0."""
    g = torch.Generator().manual_seed(3)
    N, K, r, s = 45, 70, 6, 0.3
    A, B = torch.randn(r, K, generator=g).to(dtype), torch.randn(N, r, generator=g).to(dtype)
    W = torch.randn(K, N, generator=g).to(dtype).t()  # non-contiguous
    W[:5] = (-s * (B[:5].double() @ A.double()) + 1e-2 * torch.randn(5, K, generator=g).double()).to(dtype)
    exact = torch.linalg.norm(W.double() + s * (B.double() @ A.double()), dim=1)
    got = dora_row_norm(W, A, B, s, dtype=dtype, backend=backend).double()
    # fp32 sums of exactly representable products, in W's magnitude: the error scale is u32·‖|W| + |s||B||A|‖
    mag = torch.linalg.norm(W.double().abs() + s * (B.double().abs() @ A.double().abs()), dim=1)
    assert (got - exact).abs().max() <= 64 * 2.0**-24 * mag.max(), (got - exact).abs().max()
    assert exact[:5].min() > 0.05 and got[:5].min() > 0.5 * exact[:5].min()  # the cancelling rows stay non-zero


@interpreter_only
def test_row_norm_nf4_weight_triton_matches_dequantized():
    """An NF4 base on the Triton path (decoded into the shared scratch buffer) against fp64 on its dequantized W."""
    g = torch.Generator().manual_seed(5)
    N, K, r, s = 40, 128, 5, 2.0
    qweight = quantize_nf4(torch.randn(N, K, generator=g), blocksize=64)
    A, B = torch.randn(r, K, generator=g), 0.1 * torch.randn(N, r, generator=g)
    W = qweight.dequantize(torch.float32).double()
    exact = torch.linalg.norm(W + s * (B.double() @ A.double()), dim=1)
    got = dora_row_norm(qweight, A, B, s, dtype=torch.float32, backend="triton").double()
    assert torch.allclose(got, exact, rtol=1e-5, atol=0), (got - exact).abs().max()


@interpreter_only
@pytest.mark.parametrize("path", qlora_path.PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_op_on_nf4_weight(monkeypatch, dtype, path):
    """QDoRA's base GEMM takes the QLoRA path FASTFT_QLORA_PATH forces (or the measured one): the row norm decodes
    W into the shared scratch once, the dequant path again for the forward and for dx, the fused path never."""
    monkeypatch.setenv(qlora_path.ENV, path)
    decoded = []
    scratch = qlora_path.dequant_scratch
    monkeypatch.setattr(qlora_path, "dequant_scratch", lambda *a: decoded.append(1) or scratch(*a))
    x, W, b, A, B, m = _inputs(21, 128, 40, 4, dtype)
    qweight = quantize_nf4(W.float(), blocksize=64)
    _check(x, qweight, b, A, B, m)
    assert len(decoded) == 1 + (2 if path == "dequant" else 0)


@pytest.mark.gpu
@pytest.mark.parametrize("path", qlora_path.PATHS)
def test_fused_op_on_nf4_weight_each_path_on_gpu(monkeypatch, path):
    """QDoRA on both QLoRA base-GEMM paths on the GPU, bf16, a ragged token count, against fp64."""
    monkeypatch.setenv(qlora_path.ENV, path)
    x, W, b, A, B, m = (t.detach().cuda().requires_grad_(t.requires_grad)
                        for t in _inputs(777, 1024, 1536, 16, torch.bfloat16))
    _check(x, quantize_nf4(W.float(), blocksize=64), b, A, B, m)


# ----------------------------------------------------------------------------------------------
# Layer and model against peft

def _dora_config(**kw):
    return LoraConfig(r=4, lora_alpha=8, target_modules=ALL_LINEAR, use_dora=True, task_type="CAUSAL_LM", **kw)


def _pair(config_kw=None):
    """(fastft DoRA model, peft DoRA model) with the same trained-looking adapters."""
    return fastft_and_peft(lambda: _dora_config(**(config_kw or {})))


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_model_matches_peft_dora(backend, monkeypatch):
    if backend == "triton" and not INTERPRET:
        pytest.skip("Triton on CPU needs the interpreter")
    monkeypatch.setenv("FASTFT_LORA_BACKEND", backend)
    ours, theirs = _pair()
    layers = [m for m in ours.modules() if isinstance(m, FusedDoraLinear)]
    assert len(layers) == 2 * len(ALL_LINEAR)
    # the magnitude starts as peft's: ‖W‖ per row
    assert_same_step(step(ours, ids()), step(theirs, ids()), f"DoRA ({backend})")


def test_dropout_training_matches_peft_with_the_same_draws():
    ours, theirs = _pair(dict(lora_dropout=0.2))
    ours.train(), theirs.train()
    assert_same_step(step(ours, ids(), seed=3), step(theirs, ids(), seed=3), "DoRA with dropout")


def test_save_load_round_trips_with_peft(tmp_path):
    ours, theirs = _pair()
    loaded_by_fastft = assert_round_trips_with_peft(ours, tmp_path, peft_model=theirs)
    assert any(isinstance(m, FusedDoraLinear) for m in loaded_by_fastft.modules())


@pytest.mark.parametrize("field, value", [("fan_in_fan_out", True), ("lora_bias", True)])
def test_unfusable_dora_options_are_named(field, value):
    config = _dora_config()
    setattr(config, field, value)  # peft's own LoraConfig refuses lora_bias with DoRA at construction
    with pytest.raises(ValueError, match=f"LoraConfig.{field}=True with use_dora=True"):
        fastft.get_peft_model(tiny_llama(), config)


@interpreter_only
def test_nf4_base_dora_matches_reference_on_dequantized_weights(monkeypatch):
    """QDoRA: the magnitude starts at ‖dequant(W)‖ and the fused NF4 forward/backward equal DoRA on the
    dequantized weights."""
    monkeypatch.setenv("FASTFT_LORA_BACKEND", "triton")
    model = fastft.quantize_model(tiny_llama(intermediate_size=128), "nf4")
    qmodel = fastft.get_peft_model(model, _dora_config())
    layer = next(m for m in qmodel.modules() if isinstance(m, FusedQDoraLinear))
    W = layer.get_base_layer().weight.dequantize(torch.float32)
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    mag = layer.lora_magnitude_vector["default"].weight
    assert_close(mag.detach(), torch.linalg.norm(W + layer.scaling["default"] * B @ A, dim=1), torch.float32, "m")
    perturb_trainables(qmodel)
    x = torch.randn(2, 5, W.shape[1], requires_grad=True)
    y = layer(x)
    dy = torch.randn_like(y)
    y.backward(dy)
    y_ref, grads = _fp64_reference(x, W, None, A, B, mag, layer.scaling["default"], dy)
    assert_close(y, y_ref, torch.float32, "y")
    for name, t in dict(x=x, A=A, B=B, m=mag).items():
        assert_close(t.grad, grads[name], torch.float32, f"d{name}")


def test_dora_adapter_added_beside_a_lora_one_is_fused():
    model = fastft.get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"]))
    fastft.add_adapter(model, "dora", _dora_config())
    model.set_adapter("dora")
    layer = next(m for n, m in model.named_modules() if n.endswith("q_proj") and hasattr(m, "lora_A"))
    assert isinstance(layer, FusedDoraLinear) and "dora" in layer.lora_magnitude_vector
    with torch.no_grad():
        model(input_ids=ids())


def test_nf4_dora_saves_loads_and_merges(tmp_path):
    """QDoRA: save, load onto a freshly quantized model (FusedQDoraLinear again), and merge_and_unload (dense)."""
    def quantized():
        return fastft.quantize_model(tiny_llama(intermediate_size=128), "nf4")

    ours = fastft.get_peft_model(quantized(), _dora_config())
    perturb_trainables(ours)
    batch = ids()
    with torch.no_grad():
        want = ours(input_ids=batch).logits
    fastft.save_adapter(ours, tmp_path / "qdora")
    loaded = fastft.load_adapter(quantized(), tmp_path / "qdora")
    assert any(isinstance(m, FusedQDoraLinear) for m in loaded.modules())
    with torch.no_grad():
        assert_close(loaded(input_ids=batch).logits, want, torch.float32, "reloaded QDoRA")
        merged = fastft.merge_and_unload(loaded)
        assert not any(hasattr(m, "lora_A") for m in merged.modules())
        assert_close(merged(input_ids=batch).logits, want, torch.float32, "merged QDoRA")


@interpreter_only
def test_a_trainable_base_weight_gets_its_gradient(monkeypatch):
    """The fused op treats W as frozen: a W that requires grad takes the torch path and gets peft's gradient."""
    monkeypatch.setenv("FASTFT_LORA_BACKEND", "triton")
    ours, theirs = _pair()
    unfreeze_base_weights(ours, theirs)
    got, want = step(ours, ids()), step(theirs, ids())
    assert sum(n.endswith("base_layer.weight") for n in got[1]) == 2
    assert_same_step(got, want, "DoRA with trainable base weights")
