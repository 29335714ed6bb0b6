"""apply_method's note on a bottleneck adapter's error names the MethodOptions field (and `fastft train` flag) for
every field of BottleneckAdapterConfig it sets: size, placement, activation and both module lists, not only the
mlp_output_modules the existing test checks, and only the one the error is about."""
import pytest
import torch
import transformers as T

from fastft.integration.methods import MethodOptions, apply_method

FIELDS = ("size", "placement", "activation", "attn_output_modules", "mlp_output_modules")


def _llama():
    torch.manual_seed(0)
    return T.LlamaForCausalLM(T.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))


BAD = {
    "size": dict(adapter_size=0),
    "placement": dict(adapter_placement="after_everything"),
    "activation": dict(adapter_activation="softsign"),
    "attn_output_modules": dict(adapter_placement="houlsby", adapter_attn_output_modules=("no_such_proj",)),
    "mlp_output_modules": dict(adapter_mlp_output_modules=("no_such_proj",)),
}


@pytest.mark.parametrize("field", FIELDS)
def test_each_adapter_field_error_names_its_option(field):
    with pytest.raises(ValueError) as error:
        apply_method(_llama(), "adapter", MethodOptions(**{"adapter_size": 8, **BAD[field]}))
    assert f"BottleneckAdapterConfig.{field}" in str(error.value)
    option = f"adapter_{field}"
    assert getattr(error.value, "__notes__", []) == [
        f"apply_method('adapter'): set by MethodOptions.{option} (fastft train --{option.replace('_', '-')})"]
