"""A modules_to_save entry matches a module as peft matches it: the module name ends with it. An entry that is only
part of a name (a truncated "lm_hea", or "embed" for embed_tokens) makes peft train and save nothing for it."""
import pytest
from peft import LoraConfig

import fastft
from tests.utils import tiny_llama


@pytest.mark.parametrize("entry", ["lm_hea", "embed", "model.layers.0.self"])
def test_modules_to_save_entry_inside_a_name_is_refused(entry):
    config = LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=[entry])
    with pytest.raises(ValueError, match=rf"modules_to_save entry '{entry}' matches no module"):
        fastft.get_peft_model(tiny_llama(), config)


def test_modules_to_save_name_suffix_is_accepted():
    model = fastft.get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    assert any(p.requires_grad for n, p in model.named_parameters() if "modules_to_save" in n)
