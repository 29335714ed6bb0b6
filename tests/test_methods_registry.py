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


@pytest.mark.parametrize("method", ["dora", "ia3", "prefix", "prompt"])
def test_every_peft_method_builds_the_same_trainables_in_both_implementations(method):
    options = MethodOptions(rank=4, num_virtual_tokens=3)
    names = {}
    for implementation in ("fastft", "peft"):
        model = apply_method(_tiny_llama(), method, options, implementation=implementation)
        names[implementation] = sorted(n for n, p in model.named_parameters() if p.requires_grad)
        assert names[implementation], f"{method} ({implementation}) trains nothing"
    assert names["fastft"] == names["peft"]


def test_a_peft_config_fastft_lacks_lists_the_supported_ones():
    import peft

    import fastft

    with pytest.raises(TypeError, match=r"LoHaConfig is not supported by fastft; supported configs: LoraConfig, "
                                        r"LoraConfig\(use_dora=True\), IA3Config, PrefixTuningConfig"):
        fastft.get_peft_model(_tiny_llama(), peft.LoHaConfig(target_modules=["q_proj"]))
