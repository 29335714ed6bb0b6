"""A QLoRA adapter made with target_modules="all-linear" on an MoE model whose router is an NF4 linear layer (AFMoE)
loads back onto the quantized model, and a peft adapter that names the router by its weight (target_parameters
"gate.weight", trained on the dense model) loads onto the quantized one as peft loads it onto the dequantized one.

peft's MoE conversion names the router by its weight; on the NF4 model peft gives it a QLoRA layer (x·Aᵀ·Bᵀ, the
LoRA on the parameter). load_adapter refused both as "target_parameters on NF4 layers" (found by the round-14
registry sweep: fastft could not load the adapter it had saved)."""
import copy

import peft
import pytest
import torch
import transformers as T

import fastft
from fastft.modules.nf4_linear import NF4Linear

afmoe = pytest.importorskip("transformers.models.afmoe")

IDS = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(0))


def _afmoe():
    torch.manual_seed(0)
    config = T.CONFIG_MAPPING["afmoe"](
        vocab_size=128, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64, num_experts=4,
        num_experts_per_tok=2, num_shared_experts=1, sliding_window=8,
        layer_types=["sliding_attention", "full_attention"])
    return T.AutoModelForCausalLM.from_config(config).eval()


def _routers(model):
    return [n for n, m in model.named_modules() if n.endswith("router.gate") and isinstance(m, NF4Linear)]


def _logits(model):
    with torch.no_grad():
        return model.eval()(input_ids=IDS).logits


def test_an_all_linear_qlora_adapter_on_an_nf4_router_loads_back(tmp_path):
    base = _afmoe()
    quantized = fastft.quantize_model(copy.deepcopy(base))
    routers = _routers(quantized)
    assert routers  # the router is NF4 here, as bitsandbytes quantizes it
    made = fastft.get_peft_model(quantized, peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                            init_lora_weights=False))
    fastft.save_adapter(made, tmp_path)
    loaded = fastft.load_adapter(fastft.quantize_model(copy.deepcopy(base)), tmp_path)
    torch.testing.assert_close(_logits(loaded), _logits(made), rtol=0, atol=0)
    router = loaded.get_base_model().get_submodule(routers[0])
    assert isinstance(router.get_base_layer(), NF4Linear) and router.lora_A  # a QLoRA layer on the router


def test_a_peft_router_weight_adapter_loads_onto_the_quantized_model(tmp_path):
    base = _afmoe()
    trained = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj"], target_parameters=["gate.weight"], init_lora_weights=False))
    trained.save_pretrained(tmp_path)
    quantized = fastft.quantize_model(copy.deepcopy(base))
    routers = _routers(quantized)
    twin = copy.deepcopy(base)  # the dense model with the NF4 weights' values, as peft would see the quantized one
    for name in (n for n, m in quantized.named_modules() if isinstance(m, NF4Linear)):
        twin.get_submodule(name).weight.data.copy_(quantized.get_submodule(name).weight.dequantize().float())
    ours = fastft.load_adapter(quantized, tmp_path)
    theirs = peft.PeftModel.from_pretrained(twin, tmp_path)
    torch.testing.assert_close(_logits(ours), _logits(theirs), rtol=1e-5, atol=1e-5)
    router = ours.get_base_model().get_submodule(routers[0])
    assert isinstance(router.get_base_layer(), NF4Linear) and router.lora_B["default"].weight.abs().max() > 0
