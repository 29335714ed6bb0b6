"""A patched Gemma2 RMSNorm in bf16 gives transformers' bits: Gemma computes (1 + w)·x̂ in fp32 and rounds once
(the table's norm_cast "fp32"); the fp32 model tests cannot tell that from Llama's rounding (mutation PT2:
_GEMMA_LIKE norm_cast "input" survived)."""
import copy

import torch
from transformers import Gemma2Config, Gemma2ForCausalLM

import fastft


def test_bf16_gemma2_norm_bits():
    torch.manual_seed(0)
    cfg = Gemma2Config(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=16, max_position_embeddings=64)
    m = Gemma2ForCausalLM(cfg).to(torch.bfloat16).eval()
    for mod in m.modules():
        if type(mod).__name__.endswith("RMSNorm"):
            mod.weight.data.normal_(0, 0.5)
    ref = copy.deepcopy(m)
    x = torch.randn(2, 10, 64, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16) * 3
    fastft.patch_model(m, backend="torch")
    assert torch.equal(m.model.layers[0].input_layernorm(x), ref.model.layers[0].input_layernorm(x))
