"""Prompt tuning and P-tuning: peft's own implementation through fastft's entry point (input-embedding
methods, nothing to fuse), checked against peft, with save/load both ways and config errors naming the field."""
import peft
import pytest
import torch
from peft import PromptEncoderConfig, PromptTuningConfig

import fastft
from tests.methods_utils import assert_same_step, copy_trainables, ids, perturb_trainables, step
from tests.utils import assert_close, tiny_llama

CONFIGS = {
    "prompt": lambda: PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
    "p-tuning": lambda: PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, encoder_hidden_size=32),
}


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_matches_peft_and_round_trips(kind, tmp_path):
    ours = fastft.get_peft_model(tiny_llama(), CONFIGS[kind]())
    theirs = peft.get_peft_model(tiny_llama(), CONFIGS[kind]())
    perturb_trainables(ours)
    copy_trainables(ours, theirs)
    assert_same_step(step(ours, ids()), step(theirs, ids()), kind)
    batch = ids()
    with torch.no_grad():
        want = ours(input_ids=batch).logits
    fastft.save_adapter(ours, tmp_path / "ours")
    by_peft = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "ours"))
    with torch.no_grad():
        assert_close(by_peft(input_ids=batch).logits, want, torch.float32, f"{kind}: fastft → peft")
    by_peft.save_pretrained(str(tmp_path / "theirs"))
    by_fastft = fastft.load_adapter(tiny_llama(), tmp_path / "theirs")
    with torch.no_grad():
        assert_close(by_fastft(input_ids=batch).logits, want, torch.float32, f"{kind}: peft → fastft")


@pytest.mark.parametrize("config, message", [
    (PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=4), r"PromptTuningConfig.task_type='SEQ_CLS'"),
    (PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=0), r"PromptTuningConfig.num_virtual_tokens=0"),
    (PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=-2, encoder_hidden_size=8),
     r"PromptEncoderConfig.num_virtual_tokens=-2"),
])
def test_bad_configs_are_named(config, message):
    with pytest.raises(ValueError, match=message):
        fastft.get_peft_model(tiny_llama(), config)
