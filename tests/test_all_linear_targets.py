"""`fastft train --target-modules all-linear`: peft's shorthand for every linear layer but the output head (a peft
user's habit; it stopped with "matches no module"), for LoRA, DoRA and QLoRA; mixed with module names it is refused
before any model loads."""
import pytest

from fastft.apps.training.config import ConfigError, TrainConfig, validate
from fastft.apps.training.run_setup import apply_method_or_config_error
from tests.utils import tiny_llama

PROJECTIONS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


@pytest.mark.parametrize("method", ["lora", "dora", "qlora"])
def test_all_linear_adapts_every_linear_layer_but_the_head(method):
    notes = []
    model = apply_method_or_config_error(tiny_llama(), TrainConfig(method=method, target_modules=("all-linear",)),
                                         notes.append)
    adapted = {name for name, module in model.named_modules() if hasattr(module, "lora_A")}
    assert {name.rsplit(".", 1)[-1] for name in adapted} == PROJECTIONS
    assert len(adapted) == 2 * len(PROJECTIONS) and not any("lm_head" in name for name in adapted)
    assert notes == []


def test_all_linear_stands_alone():
    with pytest.raises(ConfigError, match="--target-modules all-linear q_proj: all-linear .* stands alone"):
        validate(TrainConfig(method="lora", target_modules=("all-linear", "q_proj")))
