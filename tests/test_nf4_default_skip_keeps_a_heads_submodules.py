"""quantize_model keeps dense the linear layers *under* a default-skipped module ("lm_head" keeps "lm_head.dense",
nf4_skip.kept_by_default): RoBERTa's causal-LM head is a module holding a dense projection and the decoder, both
left dense; the encoder's layers are quantized. The GIT and Llama comparisons have no layer under a skipped name, so
that part of the rule was never exercised."""
import pytest
import torch

import fastft
from fastft.modules.nf4_linear import NF4Linear

transformers = pytest.importorskip("transformers")


def test_the_linear_layers_under_the_lm_head_stay_dense():
    torch.manual_seed(0)
    model = transformers.RobertaForCausalLM(transformers.RobertaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        max_position_embeddings=64, is_decoder=True))
    under_head = [n for n, m in model.named_modules() if n.startswith("lm_head.") and type(m) is torch.nn.Linear]
    assert sorted(under_head) == ["lm_head.decoder", "lm_head.dense"]
    fastft.quantize_model(model, "nf4")
    assert all(type(model.get_submodule(n)) is torch.nn.Linear for n in under_head)
    quantized = [n for n, m in model.named_modules() if isinstance(m, NF4Linear)]
    assert quantized and all(n.startswith("roberta.encoder.") for n in quantized)
