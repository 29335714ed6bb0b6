"""save_nf4_model stores a tied output head once, under the input embedding's key, whatever order the model
registers its modules in; load_nf4_model re-ties the head to it. CamembertForCausalLM and XLMRobertaForCausalLM
register lm_head before the embeddings: the file kept `lm_head.decoder.weight`, dropped the embedding, and the
checkpoint could not be loaded (found by the round-14 registry sweep, docs/fuzz-results.md)."""
import pytest
import torch
import transformers as T
from safetensors import safe_open

import fastft


@pytest.mark.parametrize("config_class, model_class", [(T.CamembertConfig, T.CamembertForCausalLM),
                                                       (T.XLMRobertaConfig, T.XLMRobertaForCausalLM),
                                                       (T.LlamaConfig, T.LlamaForCausalLM)])
def test_a_tied_head_round_trips(config_class, model_class, tmp_path):
    torch.manual_seed(0)
    config = config_class(vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                          num_attention_heads=4, max_position_embeddings=64, is_decoder=True, tie_word_embeddings=True)
    model = model_class(config).eval()
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    assert head.weight is embedding.weight
    fastft.quantize_model(model)
    fastft.save_nf4_model(model, tmp_path, compute_dtype=torch.float32)
    embedding_key = next(f"{n}.weight" for n, m in model.named_modules() if m is embedding)
    head_key = next(f"{n}.weight" for n, m in model.named_modules() if m is head)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert embedding_key in keys and head_key not in keys
    loaded = fastft.load_nf4_model(str(tmp_path), dtype=torch.float32)
    assert loaded.get_output_embeddings().weight is loaded.get_input_embeddings().weight
    ids = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)
