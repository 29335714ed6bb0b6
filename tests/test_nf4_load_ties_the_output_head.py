"""load_nf4_model on a checkpoint with tied word embeddings (transformers saves no lm_head.weight then): the dense
lm_head is the loaded embedding, tied, not a newly initialised random head."""
import warnings

import torch

from fastft.integration.nf4_files import load_nf4_model
from tests.utils import tiny_llama


def test_tied_checkpoint_loads_its_head_as_the_embedding(tmp_path):
    dense = tiny_llama(tie_word_embeddings=True)
    assert dense.lm_head.weight is dense.model.embed_tokens.weight
    dense.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "newly initialised" head
        model = load_nf4_model(str(tmp_path), dtype=torch.float32)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    torch.testing.assert_close(model.lm_head.weight, dense.model.embed_tokens.weight)
