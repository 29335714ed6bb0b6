"""packing_isolates must see the small leak of a model whose attention crosses packed documents but fades with
distance (BLOOM: ALiBi, no position_ids), about 1e-2 relative on a random one, against 0.0 for Llama: its bound is
tight (1e-4). Mutation run 18: a loose bound (1e-1) passed every test, and BLOOM would have trained on packed rows
whose documents see each other. Llama, which isolates them, against it."""
import torch
from transformers import BloomConfig, BloomForCausalLM

from fastft.apps.training.objectives import packing_isolates
from tests.utils import tiny_llama


def test_bloom_leaks_and_llama_does_not():
    torch.manual_seed(0)
    bloom = BloomForCausalLM(BloomConfig(vocab_size=64, hidden_size=32, n_layer=1, n_head=2)).eval()
    assert not packing_isolates(bloom, False)
    assert packing_isolates(tiny_llama(), False)
