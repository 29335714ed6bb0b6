"""--adapter-attn-output-modules is read by houlsby adapters only: under the default pfeiffer placement it is never
checked against the model (a value naming the MLP output, which pfeiffer adapts, or no module at all, is no error),
while under houlsby the two lists naming one module is refused before the method is applied."""
import pytest
from transformers import LlamaConfig, LlamaForCausalLM

from fastft.apps.training.config import ConfigError, TrainConfig
from fastft.apps.training.run_setup import check_module_choices


@pytest.fixture(scope="module")
def model():
    return LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=2))


@pytest.mark.parametrize("attn", [("down_proj",), ("mlp",)])
def test_pfeiffer_does_not_check_the_attention_list(model, attn):
    check_module_choices(model, TrainConfig(method="adapter", adapter_placement="pfeiffer",
                                            adapter_attn_output_modules=attn))


def test_houlsby_checks_both_lists(model):
    with pytest.raises(ConfigError, match="both name model.layers.0.mlp.down_proj"):
        check_module_choices(model, TrainConfig(method="adapter", adapter_placement="houlsby",
                                                adapter_attn_output_modules=("down_proj",)))
    with pytest.raises(ConfigError, match="--adapter-attn-output-modules mlp: names model.layers.0.mlp"):
        check_module_choices(model, TrainConfig(method="adapter", adapter_placement="houlsby",
                                                adapter_attn_output_modules=("mlp",)))
