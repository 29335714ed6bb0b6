"""fastft.patch_model takes a model type outside its table as a table architecture only when the model's class *is*
that architecture's transformers class (its module too), not any class of the same name: remote code often copies
Llama's modeling file, changes it, and keeps the name LlamaForCausalLM; patching it as Llama would replace code
fastft has not checked. Such a model is refused by its model type."""
import pytest
import torch

import fastft

transformers = pytest.importorskip("transformers")


class RemoteLlamaConfig(transformers.LlamaConfig):
    model_type = "remote_llama"


class LlamaForCausalLM(transformers.LlamaForCausalLM):  # a remote-code copy: same name, another module
    config_class = RemoteLlamaConfig


def test_a_same_named_class_from_another_module_is_refused():
    assert LlamaForCausalLM.__name__ == transformers.LlamaForCausalLM.__name__
    assert LlamaForCausalLM.__module__ != transformers.LlamaForCausalLM.__module__
    torch.manual_seed(0)
    model = LlamaForCausalLM(RemoteLlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64,
                                               num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                               max_position_embeddings=64))
    with pytest.raises(ValueError, match="architecture 'remote_llama' is not supported"):
        fastft.patch_model(model)
