"""Bad input that was taken, from an audit of what users see (648 probes over the public API and the CLI; the ones
that silently did something wrong). Each is now refused, naming the argument and what was expected."""
from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PrefixTuningConfig, PromptTuningConfig

import fastft
from fastft.ops import ia3_linear, linear_dpo_loss
from tests.utils import tiny_llama


def _lora_model():
    return fastft.get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"]))


def test_save_adapter_refuses_an_empty_path(tmp_path, monkeypatch):
    """"" was taken as "." (peft's own save raises): the working directory replaced by an adapter folder."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="empty path"):
        fastft.save_adapter(_lora_model(), "")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("where", [".", ".."])
def test_a_save_over_the_working_directory_leaves_the_process_in_it(tmp_path, monkeypatch, where):
    """A folder save replaces the folder as a whole: a process standing in it (or below it) was left in a removed
    folder (os.getcwd() failed, relative paths too)."""
    work = tmp_path / "project"
    work.mkdir()
    (work / "train.py").write_text("print()\n")
    monkeypatch.chdir(work)
    fastft.save_adapter(_lora_model(), where)
    assert Path(os.getcwd()) == work.resolve()
    assert Path("train.py").read_text() == "print()\n"
    fastft.load_adapter(tiny_llama(), Path(where).resolve())


def test_save_adapter_keeps_a_model_card_s_text_as_peft_does(tmp_path):
    """peft's save_pretrained updates a README.md in place; the atomic save wrote a fresh one over it."""
    (tmp_path / "README.md").write_text("# notes on this run\n")
    fastft.save_adapter(_lora_model(), tmp_path)
    card = (tmp_path / "README.md").read_text()
    assert "notes on this run" in card and "peft" in card.lower()


def test_get_peft_model_on_a_peft_model_s_base_is_refused_and_its_adapter_kept():
    """pm.get_base_model() holds pm's LoRA layers: peft built adapter 'default' again in them (B zeroed)."""
    model = _lora_model()
    b = model.base_model.model.model.layers[0].self_attn.q_proj.lora_B["default"].weight
    with torch.no_grad():
        b.fill_(0.5)
    for inner in (model.get_base_model(), model.base_model):
        with pytest.raises(TypeError, match="get_peft_model: the model holds peft adapters.*fastft.add_adapter"):
            fastft.get_peft_model(inner, LoraConfig(r=4, target_modules=["q_proj"]))
    assert bool((b == 0.5).all())


def test_prepare_model_for_kbit_training_after_the_adapters_is_refused():
    """It freezes every parameter: called on the PeftModel it left nothing to train, silently."""
    model = _lora_model()
    with pytest.raises(TypeError, match="prepare_model_for_kbit_training: .*call it on the base model"):
        fastft.prepare_model_for_kbit_training(model)
    assert sum(p.requires_grad for p in model.parameters()) == 4


def test_ia3_linear_takes_only_a_bool_feedforward():
    x, w, vector = torch.randn(3, 8), torch.randn(8, 8), torch.rand(8, 1)
    with pytest.raises(TypeError, match="`feedforward` must be True or False, got 'False'"):
        ia3_linear(x, w, None, vector, feedforward="False")  # a truthy string: (x·l)·Wᵀ where (x·Wᵀ)·l was meant


@pytest.mark.parametrize("field, kwargs", [
    ("lora_alpha", {"lora_alpha": 0}), ("lora_alpha", {"lora_alpha": math.nan}), ("lora_alpha", {"lora_alpha": "16"}),
    ("lora_alpha", {"lora_alpha": -8}), (r"alpha_pattern\['q_proj'\]", {"alpha_pattern": {"q_proj": 0}})])
def test_lora_alpha_must_be_a_positive_finite_number(field, kwargs):
    """0 trained nothing (every adapter gradient 0); nan failed at the first forward; a string inside peft."""
    with pytest.raises(ValueError, match=f"LoraConfig.{field}=.*expected a positive finite number"):
        fastft.get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"], **kwargs))


def test_save_nf4_model_takes_only_a_dtype_bitsandbytes_computes_in(tmp_path):
    """torch.int8 was written into the quantization config: a checkpoint whose forward failed once loaded."""
    model = fastft.quantize_model(tiny_llama())
    with pytest.raises(ValueError, match="`compute_dtype` must be torch.float32, torch.float16 or torch.bfloat16"):
        fastft.save_nf4_model(model, tmp_path / "int8", compute_dtype=torch.int8)
    assert not (tmp_path / "int8").exists()
    fastft.save_nf4_model(model, tmp_path / "bf16", compute_dtype="bfloat16")  # the config's own spelling
    assert '"bnb_4bit_compute_dtype": "bfloat16"' in (tmp_path / "bf16" / "config.json").read_text()


@pytest.mark.parametrize("beta", [0.0, -0.1])
def test_linear_dpo_loss_refuses_a_beta_that_is_not_positive(beta):
    """A negative beta swaps chosen and rejected (training pulls towards the rejected answers); 0 trains nothing."""
    hidden, weight, labels = torch.randn(2, 3, 16), torch.randn(10, 16), torch.randint(0, 10, (2, 3))
    with pytest.raises(ValueError, match="`beta` must be a positive finite number"):
        linear_dpo_loss(hidden, hidden + 0.3, weight, labels, labels, ref_chosen_logps=torch.zeros(2),
                        ref_rejected_logps=torch.zeros(2), beta=beta)


def test_prefix_tuning_refuses_zero_virtual_tokens():
    """Accepted, then the first forward failed inside flash_attention (prompt tuning refused it already)."""
    with pytest.raises(ValueError, match="PrefixTuningConfig.num_virtual_tokens=0: expected a positive integer"):
        fastft.get_peft_model(tiny_llama(), PrefixTuningConfig(num_virtual_tokens=0, task_type="CAUSAL_LM"))


@pytest.mark.parametrize("name", ["", "a.b", None, 3])
def test_adapter_names_peft_cannot_key_are_refused(name, tmp_path):
    """peft keys modules by adapter name: '' / 'a.b' / None / 3 failed deep inside torch or peft."""
    config = LoraConfig(r=4, target_modules=["q_proj"])
    with pytest.raises(ValueError, match="get_peft_model: `adapter_name` must be a non-empty str without '.'"):
        fastft.get_peft_model(tiny_llama(), config, adapter_name=name)
    model = _lora_model()
    with pytest.raises(ValueError, match="add_adapter: `adapter_name` must be"):
        fastft.add_adapter(model, name, config)
    fastft.save_adapter(model, tmp_path / "adapter")
    with pytest.raises(ValueError, match="load_adapter: `adapter_name` must be"):
        fastft.load_adapter(model, tmp_path / "adapter", adapter_name=name)
    assert list(model.peft_config) == ["default"]


@pytest.mark.parametrize("config", [PrefixTuningConfig, PromptTuningConfig])
def test_merge_and_unload_of_prompt_learning_says_there_is_nothing_to_merge(config):
    """An AttributeError from torch ('LlamaForCausalLM' object has no attribute 'merge_and_unload') before."""
    model = fastft.get_peft_model(tiny_llama(), config(num_virtual_tokens=4, task_type="CAUSAL_LM"))
    with pytest.raises(TypeError, match="merge_and_unload: prefix / prompt tuning .* nothing to merge"):
        fastft.merge_and_unload(model)
