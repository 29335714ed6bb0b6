"""Review fixes in the LoRA modules and patch_model: fp64 under torch.autocast stays fp64 (as torch's own ops do),
layers behind accelerate's offload hooks are called rather than read, and unpatch_model restores the copies peft
makes of patched modules (modules_to_save)."""
import copy
import io

import peft
import pytest
import torch
from peft import LoraConfig
from torch import nn

import fastft
from fastft.modules.nf4_linear import NF4Linear
from fastft.ops.qlora import nf4_linear, qlora_linear
from fastft.ops.shared import autocast_inputs
from fastft.quant.nf4_weight import quantize_nf4
from tests.utils import randomize_lora_B, tiny_llama


class Tiny(nn.Module):
    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.q = nn.Linear(32, 24, dtype=dtype)
        self.v = nn.Linear(24, 32, dtype=dtype)

    def forward(self, x):
        return self.v(torch.relu(self.q(x)))


def _pair(dtype=torch.float32):
    """(fastft LoRA model, peft LoRA model) with the same weights, B nonzero."""
    torch.manual_seed(0)
    base = Tiny(dtype)
    config = dict(r=4, lora_alpha=8, target_modules=["q", "v"])
    ours, theirs = fastft.get_peft_model(copy.deepcopy(base), LoraConfig(**config)), \
        peft.get_peft_model(base, LoraConfig(**config))
    randomize_lora_B(ours)
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


# ---- 1. fp64 under autocast


def test_autocast_inputs_casts_what_torch_autocast_casts():
    x64, x32, x16 = (torch.ones(2, dtype=d) for d in (torch.float64, torch.float32, torch.float16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = autocast_inputs(x64, x32, x16, None)
    assert [t.dtype for t in got[:3]] == [torch.float64, torch.bfloat16, torch.bfloat16] and got[3] is None
    assert got[0] is x64


def test_fp64_lora_under_bf16_autocast_stays_fp64_like_peft():
    ours, theirs = _pair(torch.float64)
    x = torch.randn(2, 5, 32, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, want = ours(x), theirs(x)
        y.square().sum().backward()
        want.square().sum().backward()
    assert y.dtype == want.dtype == torch.float64
    torch.testing.assert_close(y, want, rtol=1e-12, atol=1e-12)
    grads = {n: p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    for n, p in ours.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, grads[n], rtol=1e-12, atol=1e-12)


def test_fp64_input_to_an_fp32_lora_model_under_autocast_is_refused_as_by_torch():
    ours, theirs = _pair(torch.float32)
    x = torch.randn(3, 32, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for model in (theirs, ours):  # torch's own linear: fp64 x is not cast, the weight is: mixed dtypes
            with pytest.raises(RuntimeError):
                model(x)


@pytest.mark.parametrize("op", ["nf4_linear", "qlora_linear"])
def test_nf4_ops_refuse_fp64_under_autocast_as_without(op):
    torch.manual_seed(0)
    q = quantize_nf4(torch.randn(24, 64))
    x = torch.randn(3, 64, dtype=torch.float64)
    A, B = torch.randn(4, 64), torch.randn(24, 4)
    call = (lambda: nf4_linear(x, q)) if op == "nf4_linear" else (lambda: qlora_linear(x, q, None, A, B, 2.0))
    for enabled in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
            with pytest.raises(ValueError, match=f"{op}: `x` must be float32, float16 or bfloat16"):
                call()


# ---- 3. accelerate's hooks


def test_lora_on_an_accelerate_offloaded_model_matches_peft():
    from accelerate import cpu_offload

    ours, theirs = _pair()
    x = torch.randn(2, 5, 32)
    before = theirs(x)
    for model in (ours, theirs):
        cpu_offload(model, execution_device=torch.device("cpu"))
    assert ours.base_model.model.q.base_layer.weight.is_meta
    with torch.no_grad():
        y, want = ours(x), theirs(x)
    assert torch.equal(y, want)
    torch.testing.assert_close(y, before)


def test_qlora_base_behind_an_accelerate_hook_is_called():
    from accelerate.hooks import ModelHook, add_hook_to_module

    class Count(ModelHook):
        calls = 0

        def pre_forward(self, module, *args, **kwargs):
            Count.calls += 1
            return args, kwargs

    torch.manual_seed(0)
    model = Tiny()
    model.q = NF4Linear.from_linear(model.q)
    model = fastft.get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q"]))
    randomize_lora_B(model)
    x = torch.randn(3, 32)
    want = model(x)
    add_hook_to_module(model.base_model.model.q.base_layer, Count())
    y = model(x)
    assert Count.calls == 1  # peft's forward calls the base layer (the fused op would read its weight)
    torch.testing.assert_close(y, want)


# ---- 2. unpatch_model and peft's copies of patched modules


def _patched_classes(model):
    return [n for n, m in model.named_modules() if hasattr(type(m), "_fastft_original_class")]


def test_unpatch_restores_modules_peft_copied_after_patching():
    config = dict(r=4, target_modules=["q_proj"], modules_to_save=["model.norm"])
    ref = tiny_llama()
    model = copy.deepcopy(ref)
    torch.manual_seed(1)
    ref = fastft.get_peft_model(ref, LoraConfig(**config))
    fastft.patch_model(model, backend="torch")
    torch.manual_seed(1)
    model = fastft.get_peft_model(model, LoraConfig(**config))
    randomize_lora_B(model)
    ref.load_state_dict(model.state_dict())
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ref(input_ids=ids).logits
        assert _patched_classes(model)
        fastft.unpatch_model(model)
        assert _patched_classes(model) == []
        assert torch.equal(model(input_ids=ids).logits, want)
        torch.save(model, io.BytesIO())
        fastft.patch_model(model, backend="torch")  # the copy no longer looks patched by someone else
        assert "base_model.model.model.norm.modules_to_save.default" in _patched_classes(model)
        torch.testing.assert_close(model(input_ids=ids).logits, want, rtol=1e-4, atol=1e-4)
        fastft.unpatch_model(model)
        assert _patched_classes(model) == [] and torch.equal(model(input_ids=ids).logits, want)


def test_patch_takes_a_copy_of_a_patched_module_into_its_record():
    donor, model = tiny_llama(), tiny_llama()
    fastft.patch_model(donor, backend="torch")
    model.model.norm = copy.deepcopy(donor.model.norm)  # patched, but in no record of this model
    fastft.unpatch_model(donor)
    fastft.patch_model(model, backend="torch")
    assert model._fastft_patch.summary["rms_norm"] == 2 * 2 + 1
    fastft.unpatch_model(model)
    assert _patched_classes(model) == []
