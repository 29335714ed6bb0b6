"""Two LoraConfig checks against what peft builds: init_lora_weights="olora" on GPT-2's Conv1D layers was accepted
and the first forward failed on a shape (peft builds A and B transposed there) — refused naming the field; and
exclude_modules removing every match in a layer that layers_to_transform names was refused as "has no layer 0"
(untrue: peft adapts the other layers) — built as peft builds it."""
import copy
import warnings

import peft
import pytest
import torch
from peft import LoraConfig
from transformers import GPT2Config, GPT2LMHeadModel

import fastft
from tests.utils import tiny_llama


def test_olora_on_conv1d_layers_is_refused_naming_the_field():
    model = GPT2LMHeadModel(GPT2Config(vocab_size=128, n_embd=64, n_layer=1, n_head=4, n_positions=32))
    with pytest.raises(ValueError, match=r"LoraConfig.init_lora_weights='olora' .* Conv1D"):
        fastft.get_peft_model(model, LoraConfig(r=4, target_modules=["c_attn"], init_lora_weights="olora"))


def test_olora_on_linear_layers_still_matches_peft():
    model = tiny_llama()
    config = LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="olora")
    ref = peft.get_peft_model(copy.deepcopy(model), copy.deepcopy(config))
    ours = fastft.get_peft_model(copy.deepcopy(model), copy.deepcopy(config))
    ids = torch.randint(0, 128, (1, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, ref(input_ids=ids).logits)


def test_layers_to_transform_naming_a_layer_exclude_modules_emptied_builds_as_peft():
    model = tiny_llama()
    config = LoraConfig(r=4, target_modules=["q_proj"], exclude_modules=r".*\.0\..*", layers_to_transform=[0, 1])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = peft.get_peft_model(copy.deepcopy(model), copy.deepcopy(config))
        ours = fastft.get_peft_model(copy.deepcopy(model), copy.deepcopy(config))
    trainable = [n for n, p in ours.named_parameters() if p.requires_grad]
    assert trainable == [n for n, p in ref.named_parameters() if p.requires_grad]
    assert trainable and all("layers.1." in n for n in trainable)


def test_an_index_no_layer_has_is_still_refused():
    config = LoraConfig(r=4, target_modules=["q_proj"], exclude_modules=r".*\.0\..*", layers_to_transform=[1, 5])
    with pytest.raises(ValueError, match=r"layers_to_transform=\[1, 5\]: LlamaForCausalLM has no layer 5"):
        fastft.get_peft_model(tiny_llama(), config)
