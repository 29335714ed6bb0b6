"""final_softcap refuses a model that scales its logits after the head (config.logit_scale etc.: the objectives do
not apply it), but a scale of exactly 1 changes nothing and is accepted, as the head alone gives those logits.
Mutation run 18: refusing a scale of 1 too passed every test."""
import pytest

from fastft.apps.training.config import ConfigError
from fastft.apps.training.objectives import final_softcap
from tests.utils import tiny_llama


def test_a_logit_scale_of_one_is_no_scaling():
    model = tiny_llama()
    model.config.logit_scale = 1
    assert final_softcap(model) is None
    model.config.logit_scale = 2
    with pytest.raises(ConfigError, match="logit_scale"):
        final_softcap(model)
