"""The fused IA3 layer called with arguments beyond x takes peft's forward, which hands them to the base layer, as
peft's own IA3 layer does: a plain nn.Linear refuses them there. Mutation run 18: fusing regardless (dropping the
arguments silently) passed every test. Against peft's layer on the same call."""
import pytest
import torch
from peft import IA3Config

from tests.methods_utils import fastft_and_peft


def test_extra_arguments_reach_the_base_layer_as_in_peft():
    ours, theirs = fastft_and_peft(lambda: IA3Config(target_modules=["k_proj"], feedforward_modules=[],
                                                     task_type="CAUSAL_LM"))
    x = torch.randn(2, 64)
    for model in (theirs, ours):
        layer = model.base_model.model.model.layers[0].self_attn.k_proj
        with pytest.raises(TypeError, match="unexpected keyword argument 'scale'"):
            layer(x, scale=2.0)
