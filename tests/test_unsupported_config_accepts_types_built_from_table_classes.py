"""fastft train's up-front architecture check (patching.patch.unsupported_config) accepts a model type outside the
table that transformers builds as one of the table's classes (EXAONE, InternLM3, IQuestCoder → LlamaForCausalLM),
which patch_model patches (_arch_of_class), and refuses one it cannot patch (mutation PT6: the class check dropped,
so train refused them before loading, survived)."""
import pytest
from transformers import AutoConfig

from fastft.integration.patching.patch import unsupported_config
from tests.utils import known_model_types


@pytest.mark.parametrize("model_type", known_model_types("exaone", "internlm3", "iquestcoder"))
def test_llama_built_types_pass(model_type):
    assert unsupported_config(AutoConfig.for_model(model_type)) is None


def test_a_type_outside_the_table_is_refused():
    reason = unsupported_config(AutoConfig.for_model("gpt2"))
    assert reason is not None and "'gpt2' is not supported" in reason
