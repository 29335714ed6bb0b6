"""Falcon's linears are FalconLinear, an nn.Linear subclass whose forward computes x·Wᵀ + b as nn.Linear's does.
fastft took them for layers with a forward of their own: LoRA, DoRA and IA3 ran peft's unfused forward. They are now
fused, equal to peft. quantize_model still leaves them dense, as transformers + bitsandbytes do (they replace nn.Linear
itself only): a FalconLinear saved NF4 would be a checkpoint they cannot load."""
import peft
import pytest
import torch
from peft import LoraConfig

import fastft
from fastft.modules import lora as lora_module
from fastft.ops.shared import computes_linear
from fastft.modules.nf4_linear import NF4Linear
from tests.methods_utils import assert_same_step, copy_trainables, ids, perturb_trainables, step

TARGETS = ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]


def tiny_falcon(seed=0):
    from transformers import FalconConfig, FalconForCausalLM

    torch.manual_seed(seed)
    config = FalconConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, bias=True)
    return FalconForCausalLM(config).eval()


def _config():
    return LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, task_type="CAUSAL_LM")


def _count_calls(monkeypatch, module, name):
    calls = []
    original = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **k: calls.append(1) or original(*a, **k))
    return calls


def test_falcon_linear_computes_a_linear_and_its_subclasses_with_own_forwards_do_not():
    from transformers.models.falcon.modeling_falcon import FalconLinear

    class Scaled(torch.nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    assert computes_linear(FalconLinear(3, 4)) and computes_linear(torch.nn.Linear(3, 4))
    assert not computes_linear(Scaled(3, 4)) and not computes_linear(torch.nn.Conv1d(3, 4, 1))


def test_lora_on_falcon_runs_the_fused_op_and_equals_peft(monkeypatch):
    ours = fastft.get_peft_model(tiny_falcon(), _config())
    theirs = peft.get_peft_model(tiny_falcon(), _config())
    perturb_trainables(ours)
    copy_trainables(ours, theirs)
    calls = _count_calls(monkeypatch, lora_module, "lora_linear")
    batch = ids()
    assert_same_step(step(ours, batch), step(theirs, batch), "Falcon LoRA")
    assert len(calls) == 4 * 2  # every targeted layer of both blocks, none through peft's forward


def test_quantize_model_leaves_falcon_linear_dense_as_transformers_and_bitsandbytes_do():
    pytest.importorskip("bitsandbytes")
    from transformers import BitsAndBytesConfig
    from transformers.integrations.bitsandbytes import replace_with_bnb_linear

    with pytest.warns(UserWarning, match="left 8 layer"):
        quantized = fastft.quantize_model(tiny_falcon(), "nf4")
    assert not any(isinstance(m, NF4Linear) for m in quantized.modules())
    by_bnb = replace_with_bnb_linear(tiny_falcon(), quantization_config=BitsAndBytesConfig(load_in_4bit=True))
    converted = {n for n, m in by_bnb.named_modules() if type(m).__module__.startswith("bitsandbytes")}
    assert converted == {"lm_head"}  # the plain nn.Linear head (the loader's skip list keeps it dense), no FalconLinear


def test_ia3_on_falcon_runs_the_fused_op_and_equals_peft(monkeypatch):
    from peft import IA3Config

    from fastft.integration.methods import ia3 as ia3_room

    config = dict(target_modules=["query_key_value", "dense_4h_to_h"], feedforward_modules=["dense_4h_to_h"],
                  task_type="CAUSAL_LM")
    ours = fastft.get_peft_model(tiny_falcon(), IA3Config(**config))
    theirs = peft.get_peft_model(tiny_falcon(), IA3Config(**config))
    perturb_trainables(ours)
    copy_trainables(ours, theirs)
    calls = _count_calls(monkeypatch, ia3_room, "ia3_linear")
    batch = ids()
    assert_same_step(step(ours, batch), step(theirs, batch), "Falcon IA3")
    assert len(calls) == 2 * 2


def test_dora_on_falcon_runs_the_fused_op_and_equals_peft(monkeypatch):
    from fastft.integration.methods import dora as dora_room

    def config():
        return LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, use_dora=True, task_type="CAUSAL_LM")

    ours = fastft.get_peft_model(tiny_falcon(), config())
    theirs = peft.get_peft_model(tiny_falcon(), config())
    perturb_trainables(ours)
    copy_trainables(ours, theirs)
    calls = _count_calls(monkeypatch, dora_room, "dora_linear")
    batch = ids()
    assert_same_step(step(ours, batch), step(theirs, batch), "Falcon DoRA")
    assert len(calls) == 4 * 2
