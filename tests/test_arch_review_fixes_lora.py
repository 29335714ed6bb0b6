"""Fixes from the review of fastft's LoRA on non-Llama families, each against peft: load_adapter reads the keys peft
saves for LoRA on parameters (Mixtral's fused experts: nested ParamWrappers, '<module>.base_layer.lora_A.weight');
QLoRA's target_modules="all-linear" adapts what peft's "all-linear" adapts on the dense twin (Mixtral's experts and
router, GPT-2's Conv1D layers kept dense); a target_modules typo on GPT-2 lists its Conv1D layers, with a
did-you-mean."""
import copy

import peft
import pytest
import torch
import transformers as T
from peft import LoraConfig, PeftModel
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file, save_file

import fastft
from fastft.modules.nf4_linear import NF4Linear
from tests.utils import randomize_lora_B, tiny_llama

IDS = torch.randint(3, 128, (2, 7), generator=torch.Generator().manual_seed(0))


def _seeded(model_class, config):
    torch.manual_seed(0)
    return model_class(config).eval()


def tiny_mixtral():
    return _seeded(T.MixtralForCausalLM, T.MixtralConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, num_local_experts=4, num_experts_per_tok=2))


def tiny_gpt2():
    return _seeded(T.GPT2LMHeadModel, T.GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                                   resid_pdrop=0, embd_pdrop=0, attn_pdrop=0))


def _logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def _adapted(model) -> set[str]:
    """Names of the modules holding a LoRA adapter (a ParamWrapper nested in another counts under its own name)."""
    return {n.rsplit(".lora_A", 1)[0] for n, _ in model.named_parameters() if ".lora_A." in n}


# ------------------------------------------------------------- 2. load_adapter and LoRA on parameters (Mixtral)

def _saved(model, path):
    randomize_lora_B(model, std=0.2, seed=3)
    model.eval()
    expected = _logits(model)
    model.save_pretrained(str(path))
    return expected


def test_fastft_all_linear_on_mixtral_loads_back_as_peft_loads_it(tmp_path):
    """all-linear on Mixtral adapts the experts' two fused parameters (nested peft ParamWrappers) and the router."""
    ours = fastft.get_peft_model(tiny_mixtral(), LoraConfig(r=4, target_modules="all-linear"))
    assert {"model.layers.0.mlp.experts.base_layer", "model.layers.0.mlp.gate"} <= {
        n.removeprefix("base_model.model.") for n in _adapted(ours)}
    expected = _saved(ours, tmp_path)
    by_peft = PeftModel.from_pretrained(tiny_mixtral(), str(tmp_path))
    again = fastft.load_adapter(tiny_mixtral(), tmp_path)
    assert torch.allclose(_logits(by_peft), expected, rtol=0, atol=1e-6)
    assert torch.allclose(_logits(again), _logits(by_peft), rtol=0, atol=1e-6)
    assert not torch.allclose(_logits(again), _logits(tiny_mixtral()), atol=1e-3)  # the adapter is on
    fastft.load_adapter(again, tmp_path, adapter_name="second")  # into a model that holds the wrappers already
    again.set_adapter("second")
    assert torch.allclose(_logits(again), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("params", [["experts.gate_up_proj", "experts.down_proj"], ["experts.down_proj"],
                                    ["gate.weight", "experts.gate_up_proj"]])
def test_a_peft_target_parameters_adapter_loads_as_peft_loads_it(tmp_path, params):
    """The way round fastft gives for target_parameters: create it with peft, load it with fastft.load_adapter."""
    made = peft.get_peft_model(tiny_mixtral(), LoraConfig(r=4, target_modules=["q_proj"], target_parameters=params))
    expected = _saved(made, tmp_path)
    loaded = fastft.load_adapter(tiny_mixtral(), tmp_path, is_trainable=True)
    assert torch.allclose(_logits(loaded), expected, rtol=0, atol=1e-6)
    by_peft = PeftModel.from_pretrained(tiny_mixtral(), str(tmp_path), is_trainable=True)
    assert {n for n, p in loaded.named_parameters() if p.requires_grad} == {
        n for n, p in by_peft.named_parameters() if p.requires_grad}


def test_nested_tensors_that_fit_no_targeted_parameter_or_are_missing_are_refused(tmp_path):
    made = peft.get_peft_model(tiny_mixtral(), LoraConfig(r=4, target_modules=["q_proj"],
                                                          target_parameters=["experts.gate_up_proj",
                                                                             "experts.down_proj"]))
    made.save_pretrained(str(tmp_path))
    file = tmp_path / "adapter_model.safetensors"
    tensors = load_file(file)
    nested = "base_model.model.model.layers.0.mlp.experts.base_layer"
    save_file({**tensors, f"{nested}.base_layer.lora_A.weight": tensors[f"{nested}.lora_A.weight"].clone()}, file)
    with pytest.raises(ValueError, match=r"no module 'model\.layers\.0\.mlp\.experts\.base_layer\.base_layer' "
                                         r"\(its config's target_parameters=.* wrap 2 parameter"):
        fastft.load_adapter(tiny_mixtral(), tmp_path)
    save_file({k: v for k, v in tensors.items() if not k.startswith(f"{nested}.lora_B")}, file)
    with pytest.raises(ValueError, match=r"has no tensors for 1 of the modules its config targets.*"
                                         r"model\.layers\.0\.mlp\.experts\.base_layer\)"):
        fastft.load_adapter(tiny_mixtral(), tmp_path)


# ----------------------------------------------------------- 3. QLoRA "all-linear" = peft's on the dense twin

def _dequantized_twin(quantized):
    """The quantized model with each NF4 layer back as the dense layer it replaced (nn.Linear or Conv1D)."""
    twin = copy.deepcopy(quantized)
    for name, module in list(twin.named_modules()):
        if isinstance(module, NF4Linear):
            twin.set_submodule(name, module.to_linear(torch.float32))
    return twin


@pytest.mark.parametrize("family, skip, dense_kinds", [
    (tiny_mixtral, None, {"experts", "experts.base_layer", "gate"}),  # fused experts and router, left dense
    (tiny_gpt2, ["c_fc"], {"c_fc"}),                                   # Conv1D layers kept dense
    (tiny_llama, ["down_proj"], {"down_proj"}),
    (tiny_llama, None, set()),
])
def test_qlora_all_linear_adapts_what_peft_adapts_on_the_dense_twin(tmp_path, family, skip, dense_kinds):
    quantized = fastft.quantize_model(family(), "nf4", **({"skip": skip} if skip else {}))
    twin = _dequantized_twin(quantized)
    ours = fastft.get_peft_model(quantized, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    ref = peft.get_peft_model(twin, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    assert _adapted(ours) == _adapted(ref)
    kinds = {n.split(".", 5)[-1].removeprefix("mlp.").removeprefix("self_attn.").removeprefix("attn.")
             for n in _adapted(ours)}
    assert dense_kinds <= kinds
    randomize_lora_B(ours, seed=4)
    lora = {k: v for k, v in ours.state_dict().items() if "lora_" in k}
    assert not ref.load_state_dict(lora, strict=False).unexpected_keys
    ours.eval(), ref.eval()
    assert torch.allclose(_logits(ours), _logits(ref), rtol=1e-5, atol=1e-5)
    # fastft's save loads back onto a fresh quantized base, and through peft onto the dense twin
    ours.save_pretrained(str(tmp_path))
    again = fastft.load_adapter(fastft.quantize_model(family(), "nf4", **({"skip": skip} if skip else {})), tmp_path)
    assert torch.allclose(_logits(again), _logits(ours), rtol=0, atol=1e-6)
    by_peft = PeftModel.from_pretrained(_dequantized_twin(fastft.quantize_model(
        family(), "nf4", **({"skip": skip} if skip else {}))), str(tmp_path))
    assert torch.allclose(_logits(by_peft), _logits(ours), rtol=1e-5, atol=1e-5)


def test_qlora_all_linear_on_mixtral_gives_the_ranks_and_scalings_peft_gives():
    """peft's MoE conversion doubles r and alpha on the experts' fused gate_up_proj; a user's rank_pattern stays."""
    quantized = fastft.quantize_model(tiny_mixtral(), "nf4")
    twin = _dequantized_twin(quantized)
    config = LoraConfig(r=4, lora_alpha=4, target_modules="all-linear", rank_pattern={"q_proj": 8})
    ours = fastft.get_peft_model(quantized, copy.deepcopy(config))
    ref = peft.get_peft_model(twin, copy.deepcopy(config))

    def ranks(model):
        return {n: (m.r["default"], m.scaling["default"]) for n, m in model.named_modules() if isinstance(m, LoraLayer)}

    assert ranks(ours) == ranks(ref)
    assert ranks(ours)["base_model.model.model.layers.0.mlp.experts.base_layer"] == (8, 1.0)
    assert ranks(ours)["base_model.model.model.layers.0.self_attn.q_proj"] == (8, 0.5)


# ------------------------------------------------------------------------- 5. target_modules typo on GPT-2

@pytest.mark.parametrize("quantize", [False, True])
def test_a_gpt2_target_typo_lists_its_conv1d_layers_and_the_name_meant(quantize):
    model = tiny_gpt2()
    model = fastft.quantize_model(model, "nf4", skip=["c_fc"]) if quantize else model
    with pytest.raises(ValueError) as info:
        fastft.get_peft_model(model, LoraConfig(r=4, target_modules=["c_atn"]))
    message = str(info.value)
    assert "matches no module of GPT2LMHeadModel" in message and "'c_atn': did you mean 'c_attn'?" in message
    assert message.endswith("Its linear layers are named ['c_attn', 'c_fc', 'c_proj', 'lm_head']"), message
