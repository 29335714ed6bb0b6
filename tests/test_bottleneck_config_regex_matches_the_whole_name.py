"""A BottleneckAdapterConfig module regex must match the whole module name, as peft matches a target_modules string:
"o_proj" as a regex names no module of a Llama (its names are "model.layers.0.self_attn.o_proj", ...), and the
field is named in the error. Mutation run 18: matching by re.search (anywhere in the name) passed every test."""
import re

import pytest

from fastft.integration.methods.adapter.config import BottleneckAdapterConfig
from fastft.integration.methods.adapter.model import get_adapter_model
from tests.utils import tiny_llama


def test_a_regex_is_matched_against_the_whole_name():
    model = tiny_llama()
    names = [n for n, _ in model.named_modules()]
    assert not any(re.fullmatch("down_proj", n) for n in names) and any(re.search("down_proj", n) for n in names)
    with pytest.raises(ValueError, match="BottleneckAdapterConfig.mlp_output_modules='down_proj' matches no module"):
        get_adapter_model(model, BottleneckAdapterConfig(size=4, mlp_output_modules="down_proj"))
