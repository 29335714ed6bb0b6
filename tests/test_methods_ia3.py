"""IA3: the fused op (the LoRA GEMM's K-scale prologue / column-scale epilogue, through the interpreter) and the
column-dot reduction against fp64 references; the model against peft's IA3 (forward and every gradient);
save/load both ways with peft; refused options."""
import random

import pytest
import torch
from peft import IA3Config

import fastft
from fastft.integration.methods.ia3 import FusedIA3Linear
from fastft.ops.ia3 import ia3_linear, ia3_linear_reference
from tests.methods_utils import (assert_round_trips_with_peft, assert_same_step, fastft_and_peft, ids, step,
                                 unfreeze_base_weights)
from tests.utils import INTERPRET, assert_close, interpreter_only, tiny_llama

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@interpreter_only
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("feedforward", [False, True])
@pytest.mark.parametrize("case", range(2))
def test_fused_op_fuzzed_shapes_forward_and_grads(dtype, feedforward, case):
    rng = random.Random(10 * case + DTYPES.index(dtype) + 100 * feedforward)
    M, N = rng.choice([1, 7, 37, 70]), rng.choice([16, 33, 80])
    K = rng.choice([16, 37, 64]) if dtype == torch.float32 else rng.choice([16, 40, 64])
    x = torch.randn(2, M, K).to(dtype)
    if case == 1:
        x = x.transpose(0, 1).contiguous().transpose(0, 1)  # non-contiguous leading dims
    x.requires_grad_()
    W = (torch.randn(N, K) * K**-0.5).to(dtype)
    b = (torch.randn(N) * 0.1).to(dtype).requires_grad_() if case == 0 else None
    l = (1 + 0.3 * torch.randn((1, K) if feedforward else (N, 1))).requires_grad_()  # peft's shapes, fp32
    y = ia3_linear(x, W, b, l, feedforward=feedforward, backend="triton")
    assert y.dtype == dtype and y.shape == (2, M, N)
    dy = torch.randn_like(y)
    y.backward(dy)
    leaves = {k: v.detach().double().requires_grad_(v.requires_grad) for k, v in dict(x=x, b=b, l=l).items()
              if v is not None}
    y_ref = ia3_linear_reference(leaves["x"], W.double(), leaves.get("b"), leaves["l"], feedforward)
    y_ref.backward(dy.double())
    assert_close(y, y_ref, dtype, "y")
    for name, leaf in leaves.items():
        got = dict(x=x, b=b, l=l)[name].grad
        assert got is not None and got.shape == leaf.shape, f"d{name}"
        assert_close(got, leaf.grad, dtype, f"d{name}")


@interpreter_only
@pytest.mark.parametrize("dtype", DTYPES)
def test_column_dot_matches_fp64(dtype):
    from fastft.kernels.column_dot import column_dot

    for M, N in [(1, 5), (37, 33), (300, 70)]:
        a, b = torch.randn(M, N).to(dtype), torch.randn(N, M).to(dtype).t()  # b column-major
        ref = (a.double() * b.double()).sum(0)
        assert_close(column_dot(a, b), ref, dtype, f"column_dot {M}x{N}")


def _config(**kw):
    return IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"],
                     task_type="CAUSAL_LM", **kw)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_model_matches_peft_ia3(backend, monkeypatch):
    if backend == "triton" and not INTERPRET:
        pytest.skip("Triton on CPU needs the interpreter")
    monkeypatch.setenv("FASTFT_LORA_BACKEND", backend)
    ours, theirs = fastft_and_peft(_config)
    assert sum(isinstance(m, FusedIA3Linear) for m in ours.modules()) == 6
    assert_same_step(step(ours, ids()), step(theirs, ids()), f"IA3 ({backend})")


def test_save_load_round_trips_with_peft(tmp_path):
    ours, _ = fastft_and_peft(_config)
    by_fastft = assert_round_trips_with_peft(ours, tmp_path)
    assert any(isinstance(m, FusedIA3Linear) for m in by_fastft.modules())


def test_a_second_ia3_adapter_is_fused_and_matches_peft():
    """fastft.add_adapter with an IA3Config: the new adapter's layers (gate_proj is new) are fused too."""
    def second():
        return IA3Config(target_modules=["v_proj", "gate_proj"], feedforward_modules=[], task_type="CAUSAL_LM")

    ours, theirs = fastft_and_peft(_config)
    fastft.add_adapter(ours, "second", second())
    theirs.add_adapter("second", second())
    assert sum(isinstance(m, FusedIA3Linear) for m in ours.modules()) == 8
    with torch.no_grad():
        for (name, p), (_, q) in zip(ours.named_parameters(), theirs.named_parameters()):
            if ".second" in name:
                p.uniform_(0.5, 1.5), q.copy_(p)
    for model in (ours, theirs):
        model.base_model.set_adapter(["default", "second"])
    assert_same_step(step(ours, ids()), step(theirs, ids()), "two IA3 adapters")
    with pytest.raises(TypeError, match="add_adapter: config is a PrefixTuningConfig"):
        from peft import PrefixTuningConfig

        fastft.add_adapter(ours, "third", PrefixTuningConfig(num_virtual_tokens=2, task_type="CAUSAL_LM"))


def test_unfusable_ia3_option_is_named():
    with pytest.raises(ValueError, match="IA3Config.fan_in_fan_out=True"):
        fastft.get_peft_model(tiny_llama(), _config(fan_in_fan_out=True))


@pytest.mark.parametrize("fields, message", [
    (dict(modules_to_save=["lm_hed"]), "modules_to_save"),
    (dict(target_modules="all-linear", exclude_modules=["o_prj"]), "exclude_modules"),
    (dict(target_modules="all-linear", feedforward_modules=["down_prj"]),
     r"IA3Config.feedforward_modules entries \['down_prj'\] match none.*did you mean 'down_proj'"),
])
def test_ia3_names_that_match_nothing_are_refused_as_for_lora(fields, message):
    """They were accepted: the head not trained, nothing excluded, down_proj scaled at its output instead of its
    input. (A target_modules entry that matches nothing is a warning, as for LoRA.)"""
    with pytest.raises(ValueError, match=message):
        fastft.get_peft_model(tiny_llama(), IA3Config(**{"target_modules": ["k_proj", "v_proj", "down_proj"],
                                                         "feedforward_modules": ["down_proj"], **fields}))
    from fastft.integration.lora_config import UnmatchedTargetWarning
    with pytest.warns(UnmatchedTargetWarning, match=r"IA3Config.target_modules entries \['vproj'\]"):
        fastft.get_peft_model(tiny_llama(), IA3Config(target_modules=["k_proj", "vproj"], feedforward_modules=[]))


@interpreter_only
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b_nk, tail, col, kscale", [(True, True, True, True), (False, True, True, True),
                                                     (True, False, True, True), (False, False, False, True)])
def test_lora_gemm_scale_features_against_fp64(dtype, b_nk, tail, col, kscale):
    """The kernel feature itself: c = (a·diag(k)·bᵀ + l·tᵀ)·diag(col) + bias, every combination the methods use
    and both together, ragged sizes, both storage orders of b."""
    from fastft.kernels.lora_gemm import lora_gemm

    M, K, N, R = 37, 48, 45, 16
    a = torch.randn(M, K).to(dtype)
    w = (torch.randn(N, K) * K**-0.5).to(dtype)
    b = w if b_nk else w.t().contiguous()  # logical [N, K] either way
    lo = torch.randn(M, R).to(dtype) if tail else None
    t = (torch.randn(N, R) * 0.1).to(dtype) if tail else None
    t_arg = None if t is None else (t if b_nk else t.t().contiguous())
    bias = torch.randn(N).to(dtype)
    cs = (1 + 0.5 * torch.randn(N)) if col else None
    ks = (1 + 0.5 * torch.randn(K)) if kscale else None
    got = lora_gemm(a, b, lo, t_arg, bias, b_nk=b_nk, col_scale=cs, k_scale=ks)
    ref = (a.double() * (ks.double() if kscale else 1.0)) @ w.double().t()
    if tail:
        ref = ref + lo.double() @ t.double().t()
    ref = ref * (cs.double() if col else 1.0) + bias.double()
    assert_close(got, ref, dtype, "c")


@interpreter_only
def test_a_trainable_base_weight_gets_its_gradient(monkeypatch):
    """The fused op treats W as frozen: a W that requires grad takes the torch path and gets peft's gradient."""
    monkeypatch.setenv("FASTFT_LORA_BACKEND", "triton")
    ours, theirs = fastft_and_peft(_config)
    unfreeze_base_weights(ours, theirs, modules=("k_proj", "down_proj"))  # an output and a feedforward layer
    got, want = step(ours, ids()), step(theirs, ids())
    assert sum(n.endswith("base_layer.weight") for n in got[1]) == 4
    assert_same_step(got, want, "IA3 with trainable base weights")
