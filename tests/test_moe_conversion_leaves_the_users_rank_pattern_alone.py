"""fastft's checks of a LoRA config for Mixtral (transformers 5 fused its experts: peft converts the 'w1'/'w3'
targets into 'gate_up_proj' and adds a rank pattern doubling its r) convert a copy, never the config they check:
config_copy gives the copy rank/alpha patterns of its own. Mutation run 18: sharing the dicts passed every test.
The ranks built against peft's own build from an untouched config."""
import peft
from peft import LoraConfig

import fastft
from fastft.integration.lora_config import validate_lora_config
from tests.test_mixtral_adapter_keys import quiet, ranks, tiny_mixtral


def _config():
    return LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "w1", "w3", "w2"], rank_pattern={"q_proj": 8},
                      alpha_pattern={"q_proj": 16})


def test_checking_a_config_leaves_its_patterns_alone():
    config = _config()
    quiet(validate_lora_config, config, tiny_mixtral())
    assert (config.rank_pattern, config.alpha_pattern) == (_config().rank_pattern, _config().alpha_pattern)


def test_fastft_builds_the_ranks_peft_builds():
    assert ranks(quiet(fastft.get_peft_model, tiny_mixtral(), _config())) == \
        ranks(quiet(peft.get_peft_model, tiny_mixtral(), _config()))
