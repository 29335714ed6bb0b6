"""exclude_modules given as a string is a regex peft full-matches against each module name: "q_proj" alone matches no
full name (model.layers.0.self_attn.q_proj) and so excludes nothing; it is refused, a full-name regex is not."""
import pytest
from peft import LoraConfig

import fastft
from tests.utils import tiny_llama


@pytest.mark.parametrize("regex", ["q_proj", r"layers\.0", "self_attn"])
def test_exclude_regex_matching_only_part_of_a_name_is_refused(regex):
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], exclude_modules=regex)
    with pytest.raises(ValueError, match="exclude_modules entry .* matches no module"):
        fastft.get_peft_model(tiny_llama(), config)


def test_exclude_regex_matching_a_full_name_excludes_it():
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], exclude_modules=r".*layers\.0\.self_attn\.q_proj")
    model = fastft.get_peft_model(tiny_llama(), config)
    layers = model.base_model.model.model.layers
    assert not hasattr(layers[0].self_attn.q_proj, "lora_A") and hasattr(layers[1].self_attn.q_proj, "lora_A")
