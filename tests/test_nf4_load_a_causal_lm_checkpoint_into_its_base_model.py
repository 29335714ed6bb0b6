"""transformers' base_model_prefix rule, the other way round: a causal LM's checkpoint ("model.layers.0...",
"lm_head.weight") loads into its base model (model_cls=LlamaModel) with the prefix stripped, the head's tensor, the
one the base model has no place for, dropped under its own name."""
import copy
import warnings

import torch
import transformers

import fastft
from fastft.modules.nf4_linear import NF4Linear
from tests.utils import tiny_llama


def test_a_causal_lm_checkpoint_loads_into_its_base_model(tmp_path):
    full = tiny_llama(num_hidden_layers=1, tie_word_embeddings=False)
    full.save_pretrained(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = fastft.load_nf4_model(str(tmp_path), model_cls=transformers.LlamaModel, dtype=torch.float32)
    assert type(loaded) is transformers.LlamaModel
    assert sum(isinstance(m, NF4Linear) for m in loaded.modules()) == 7
    assert torch.equal(loaded.embed_tokens.weight, full.model.embed_tokens.weight)
    assert torch.equal(loaded.norm.weight, full.model.norm.weight)
    messages = [str(w.message) for w in caught if "load_nf4_model" in str(w.message)]
    assert len(messages) == 1 and "(dropped): ['lm_head.weight']; newly initialised (train them): []" in messages[0]
    expected = fastft.quantize_model(copy.deepcopy(full.model), "nf4")
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(ids).last_hidden_state, expected(ids).last_hidden_state)
