"""merge_adapter() then unmerge_adapter() (TRL's weight-sync pattern) on a tied-embedding model with LoRA on lm_head:
the merge goes into a copy of the shared weight (so the embeddings keep theirs), and the unmerge ties lm_head to the
embedding again with the config saying tied — it left a second vocab × hidden matrix for good, which later training
of the embeddings no longer reached (logits 20 off a peft twin after 3 steps)."""
import warnings

import torch
from peft import LoraConfig

import fastft
from tests.utils import randomize_lora_B, tiny_llama


def _model():
    model = tiny_llama(tie_word_embeddings=True)
    peft_model = fastft.get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"]))
    randomize_lora_B(peft_model)
    return peft_model


def _tied(peft_model):
    base = peft_model.get_base_model()
    return base.lm_head.base_layer.weight is base.model.embed_tokens.weight and base.config.tie_word_embeddings


def test_unmerge_ties_the_head_to_the_embedding_again():
    model = _model()
    embedding = model.get_base_model().model.embed_tokens.weight
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.merge_adapter()
    assert not _tied(model)  # merged into a copy: the embeddings keep W
    assert torch.equal(model.get_base_model().model.embed_tokens.weight, embedding)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, before, rtol=1e-5, atol=1e-5)
    model.unmerge_adapter()
    assert _tied(model)
    assert model.get_base_model().lm_head.base_layer.weight is embedding  # the shared weight itself, exact
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, before, rtol=1e-5, atol=1e-5)

    # training the embeddings afterwards reaches the head too, as in a model never merged
    model.get_base_model().model.embed_tokens.weight.requires_grad_(True)
    model(input_ids=ids, labels=ids).loss.backward()
    assert model.get_base_model().lm_head.base_layer.weight.grad is embedding.grad


def test_merge_and_unload_after_merge_adapter_stays_untied():
    model = _model()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.merge_adapter()
        merged = model.merge_and_unload()
    assert merged.lm_head.weight is not merged.model.embed_tokens.weight
    assert merged.config.tie_word_embeddings is False


def test_a_second_merge_after_peft_unmerged_the_layers_itself_starts_from_the_tied_weight():
    model = _model()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.merge_adapter()
        for module in model.modules():  # what peft's set_adapter does to merged layers, past unmerge_adapter
            if hasattr(module, "unmerge") and getattr(module, "merged", False):
                module.unmerge()
        model.merge_adapter()
    model.unmerge_adapter()
    assert _tied(model)
