"""fastft.load_adapter of a saved prefix-tuning adapter, as fastft.get_peft_model builds one:

- onto a model with (non-reentrant) gradient checkpointing already on, the first adapter and a second one load
  (peft refuses prefix tuning under checkpointing; fastft hides the flags while peft builds, the load path too) and
  give the saved model's logits, the checkpointing still on;
- onto an architecture fastft's prefix room refuses (DiffLlama: its attention splits the cached values, which the
  prefix handed to the op is not) the load is refused, as get_peft_model is, rather than run another model."""
import peft
import pytest
import torch
import transformers as T

import fastft
from tests.methods_utils import perturb_trainables

LLAMA_LIKE = dict(vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64)


def _ids():
    return torch.randint(3, 128, (2, 9))


def _llama():
    torch.manual_seed(0)
    return T.LlamaForCausalLM(T.LlamaConfig(**LLAMA_LIKE))


def _config():
    return peft.PrefixTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM")


def _saved(path, seed, ids):
    model = fastft.get_peft_model(_llama(), _config())
    perturb_trainables(model, seed=seed)
    model.save_pretrained(path)
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits


def test_prefix_adapters_load_onto_a_checkpointed_model(tmp_path):
    ids = _ids()
    first, second = _saved(tmp_path / "a", 1, ids), _saved(tmp_path / "b", 2, ids)
    base = _llama()
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = fastft.load_adapter(base, tmp_path / "a")
    assert fastft.load_adapter(model, tmp_path / "b", adapter_name="b") is model
    assert all(layer.gradient_checkpointing for layer in model.get_base_model().model.layers)  # still on
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, first, rtol=0, atol=0)
        model.set_adapter("b")
        torch.testing.assert_close(model(input_ids=ids).logits, second, rtol=0, atol=0)


def test_a_prefix_adapter_onto_an_unsupported_architecture_is_refused(tmp_path):
    torch.manual_seed(0)
    make = lambda: T.DiffLlamaForCausalLM(T.DiffLlamaConfig(**LLAMA_LIKE))  # noqa: E731
    peft.get_peft_model(make(), _config()).save_pretrained(tmp_path)  # peft's own prefix tuning takes it
    with pytest.raises(ValueError, match="fastft prefix tuning does not support DiffLlamaForCausalLM: .*splits the "
                                         "cached values.*use peft's own"):
        fastft.load_adapter(make(), tmp_path)
