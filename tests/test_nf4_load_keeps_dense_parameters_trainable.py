"""load_nf4_model's dense parameters keep the requires_grad the model built them with, as transformers'
from_pretrained leaves them: embeddings, norms and a dense head train (a full fine-tune of the dense part, peft's
modules_to_save), and only the NF4 weights are frozen. Loading them frozen would leave those silently untrained."""
import torch

import fastft
from fastft.modules.nf4_linear import NF4Linear
from tests.utils import tiny_llama


def test_dense_parameters_load_trainable_and_nf4_weights_frozen(tmp_path):
    tiny_llama(num_hidden_layers=1, tie_word_embeddings=False).save_pretrained(tmp_path)
    loaded = fastft.load_nf4_model(str(tmp_path), dtype=torch.float32)
    dense = {n: p.requires_grad for n, p in loaded.named_parameters()
             if not isinstance(loaded.get_submodule(n.rpartition(".")[0]), NF4Linear)}
    assert {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"} <= dense.keys()
    assert all(dense.values()), [n for n, trainable in dense.items() if not trainable]
    nf4 = [m.weight for m in loaded.modules() if isinstance(m, NF4Linear)]
    assert len(nf4) == 7 and not any(w.requires_grad for w in nf4)
