"""fastft.integration.methods: one entry point for every method; unknown names are refused."""
import pytest
import torch
import transformers

from fastft.integration.methods import METHODS, MethodOptions, apply_method


def _tiny_llama():
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=96))


@pytest.mark.parametrize("implementation", ["fastft", "peft"])
def test_lora_trains_only_adapters_and_matches_between_implementations(implementation):
    model = apply_method(_tiny_llama(), "lora", MethodOptions(rank=4), implementation=implementation)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    # per layer r·(in+out): q, o 64→64; k, v 64→32; gate, up 64→128; down 128→64
    per_layer = 4 * (2 * 128 + 2 * 96 + 3 * 192)
    assert sum(p.numel() for n, p in model.named_parameters() if p.requires_grad) == 2 * per_layer


def test_full_trains_everything():
    model = apply_method(_tiny_llama(), "full")
    assert all(p.requires_grad for p in model.parameters())


def test_unknown_method_is_named():
    with pytest.raises(ValueError, match="unknown method 'lorra'.*lora"):
        apply_method(_tiny_llama(), "lorra")
    assert len(METHODS) == 8
