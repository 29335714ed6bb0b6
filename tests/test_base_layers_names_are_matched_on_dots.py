"""fastft.integration.base_layers matches names on dot boundaries: an adapter layer's insides are skipped, but not
a sibling whose name merely starts with the layer's (`proj` wrapped, `proj_out` next to it), and a
target_parameters entry matches the full name or a dotted suffix, as peft matches it (not `xgate.weight` for
`gate.weight`)."""
from types import SimpleNamespace

import peft
import torch
from peft import LoraConfig
from torch import nn

from fastft.integration.base_layers import modules_as_bases, targeted_parameters


class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.proj_out = nn.Linear(8, 8)

    def forward(self, x):
        return self.proj_out(self.proj(x))


def test_sibling_whose_name_extends_an_adapter_layer_is_listed():
    model = peft.get_peft_model(_Toy(), LoraConfig(r=2, target_modules=["proj"]))
    names = dict(modules_as_bases(model))
    base = "base_model.model."
    assert isinstance(names[base + "proj"], nn.Linear)  # the wrapped layer counts as its base
    assert base + "proj.lora_A" not in names
    assert isinstance(names.get(base + "proj_out"), nn.Linear)


def test_target_parameters_match_on_a_dotted_suffix_only():
    module = nn.Module()
    module.weight = nn.Parameter(torch.zeros(2, 2))
    config = SimpleNamespace(target_parameters=["gate.weight"])
    assert targeted_parameters(config, "model.layers.0.mlp.gate", module) == ["weight"]
    assert targeted_parameters(config, "model.layers.0.mlp.xgate", module) == []
    assert targeted_parameters(SimpleNamespace(target_parameters=["model.layers.0.mlp.xgate.weight"]),
                               "model.layers.0.mlp.xgate", module) == ["weight"]
