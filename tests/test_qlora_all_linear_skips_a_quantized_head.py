"""target_modules="all-linear" on a model whose output head is NF4 too (quantize_model(use_default_skip=False)):
peft leaves the output layer out on the dense model, and so must fastft's resolution of the NF4 layers."""
import copy

import peft
from peft import LoraConfig
from torch import nn

import fastft
from fastft.modules.nf4_linear import NF4Linear
from tests.utils import tiny_llama


def _adapted(model):
    return {n for n, m in model.named_modules() if hasattr(m, "lora_A") and not isinstance(m, nn.ModuleDict)}


def test_all_linear_leaves_an_nf4_lm_head_out():
    quantized = fastft.quantize_model(tiny_llama(tie_word_embeddings=False), "nf4", use_default_skip=False)
    assert isinstance(quantized.lm_head, NF4Linear)
    config = LoraConfig(r=4, target_modules="all-linear")
    ours = fastft.get_peft_model(quantized, copy.deepcopy(config))
    theirs = peft.get_peft_model(tiny_llama(tie_word_embeddings=False), copy.deepcopy(config))
    assert not any(n.endswith("lm_head") for n in _adapted(ours))
    assert _adapted(ours) == _adapted(theirs)
