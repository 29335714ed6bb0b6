"""A bottleneck adapter after a transformers Conv1D (GPT-2's c_proj, weight (nx, nf)) is as wide as the layer's
output, nf (base_layers.in_out_features reads Conv1D as (nx, nf)); GPT-2's mlp.c_proj maps n_inner to n_embd.
Mutation run 18: swapping nx and nf passed every test. At init the adapter adds nothing: the plain model's logits."""
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from fastft.integration.base_layers import in_out_features
from fastft.integration.methods.adapter.config import BottleneckAdapterConfig
from fastft.integration.methods.adapter.model import get_adapter_model


def test_gpt2_mlp_c_proj_adapter():
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=2, n_positions=16)).eval()
    c_proj = model.transformer.h[0].mlp.c_proj
    assert in_out_features(c_proj) == tuple(c_proj.weight.shape)  # Conv1D keeps its weight as (in, out)
    ids = torch.randint(0, 64, (1, 5))
    with torch.no_grad():
        want = model(input_ids=ids).logits
        wrapped = get_adapter_model(model, BottleneckAdapterConfig(size=4, mlp_output_modules=("mlp.c_proj",)))
        torch.testing.assert_close(wrapped(input_ids=ids).logits, want)
