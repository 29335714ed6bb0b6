"""patch_model rebuilds an attention forward around fastft's RoPE from its innermost function; transformers'
decorators around it were left out, so an attention called with the deprecated `past_key_values=` (transformers
maps it to `cache=` until 5.40) ignored it: no warning, the KV cache never filled. The wrappers are put back."""
import copy
import warnings

import pytest
import torch
from transformers import DynamicCache

from fastft.integration.patching import patch_model
from tests.utils import tiny_llama


def test_a_patched_attention_takes_the_old_cache_keyword_as_transformers_does():
    model = tiny_llama()
    patched = patch_model(copy.deepcopy(model))
    h = torch.randn(1, 5, 64)
    results = []
    for m in (model, patched):
        attention = m.model.layers[0].self_attn
        cos, sin = m.model.rotary_emb(h, torch.arange(5)[None])
        cache = DynamicCache(config=m.config)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out, _ = attention(h, position_embeddings=(cos, sin), attention_mask=None, past_key_values=cache)
        results.append((out, cache.get_seq_length(), [str(w.message) for w in caught if "past_key_values" in
                                                      str(w.message)]))
    (want, want_length, want_warned), (got, length, warned) = results
    if not want_warned:
        pytest.skip("this transformers has no past_key_values -> cache shim to keep")
    assert want_length == length == 5 and warned
    assert torch.allclose(got, want, atol=1e-6)
