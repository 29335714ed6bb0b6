"""merge_adapter on a tied-embeddings model (no unload, no save): the adapted layer got its own copy of the shared
weight, so the config must already say untied; else a later save/reload (or transformers' tie_weights) ties the
merged lm_head back to the embeddings. merge_and_unload masks a missing flag (peft's unload resets it), merge_adapter
does not."""
import warnings

from peft import LoraConfig

import fastft
from tests.utils import randomize_lora_B, tiny_llama


def test_merge_adapter_marks_the_config_untied():
    model = fastft.get_peft_model(tiny_llama(tie_word_embeddings=True), LoraConfig(r=4, target_modules=["lm_head"]))
    randomize_lora_B(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.merge_adapter()
    base = model.get_base_model()
    assert base.lm_head.base_layer.weight is not base.model.embed_tokens.weight
    assert base.config.tie_word_embeddings is False
    assert base.config.get_text_config().tie_word_embeddings is False
