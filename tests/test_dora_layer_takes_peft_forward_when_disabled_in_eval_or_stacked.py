"""The fused DoRA layer's dispatch rules, each against peft's own DoRA model: in eval its dropout is off (the fused
op gets p = 0), with the adapters disabled the output is the base model's, and two active DoRA adapters (which one
fused op cannot apply) take peft's forward. Mutation run 18: dropout kept in eval, the disabled flag ignored, or two
adapters fused as the first alone each passed every test."""
import torch
from peft import LoraConfig

import fastft
from fastft.integration.methods.dora import FusedDoraLinear
from tests.methods_utils import copy_trainables, fastft_and_peft, ids, perturb_trainables
from tests.utils import ALL_LINEAR


def _dora_config(**kw):
    return LoraConfig(r=4, lora_alpha=8, target_modules=ALL_LINEAR, use_dora=True, task_type="CAUSAL_LM", **kw)


def _logits(model):
    with torch.no_grad():
        return model(input_ids=ids()).logits


def test_eval_mode_runs_without_dropout():
    ours, theirs = fastft_and_peft(lambda: _dora_config(lora_dropout=0.5))
    ours.eval(), theirs.eval()
    torch.testing.assert_close(_logits(ours), _logits(theirs))


def test_disabled_adapters_give_the_base_output():
    ours, theirs = fastft_and_peft(_dora_config)
    with ours.disable_adapter(), theirs.disable_adapter():
        torch.testing.assert_close(_logits(ours), _logits(theirs))


def test_two_active_dora_adapters_match_peft():
    ours, theirs = fastft_and_peft(_dora_config)
    fastft.add_adapter(ours, "second", _dora_config())
    theirs.add_adapter("second", _dora_config())
    for model in (ours, theirs):
        model.base_model.set_adapter(["default", "second"])  # both trainable: perturbed and copied below
    perturb_trainables(ours, seed=2)
    copy_trainables(ours, theirs)
    assert any(isinstance(m, FusedDoraLinear) for m in ours.modules())
    torch.testing.assert_close(_logits(ours), _logits(theirs))
