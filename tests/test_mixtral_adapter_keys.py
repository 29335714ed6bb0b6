"""Mixtral under transformers 5 (experts fused into the parameters mlp.experts.gate_up_proj / down_proj, adapted by
peft as target_parameters), each against peft 0.21: rank_pattern / alpha_pattern keys naming a targeted parameter
give peft's ranks and scalings (keys that match nothing are still refused, naming what they could match); the
transformers 4 target names 'w1'/'w3'/'w2' convert as peft converts them; an adapter file saved under transformers 4
(per-expert keys 'block_sparse_moe.experts.<i>.w1...') loads as peft loads it, onto the model and into a PeftModel,
and one peft cannot convert is refused naming the layout found."""
import copy
import json
import warnings

import peft
import pytest
import torch
import transformers as T
from peft import LoraConfig, PeftModel
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file, save_file

import fastft
from fastft.integration.lora_config import UnmatchedTargetWarning
from fastft.modules.nf4_linear import NF4Linear

H, F, E, LAYERS = 32, 48, 4, 2  # hidden, expert intermediate size, experts, layers
IDS = torch.randint(3, 128, (2, 7), generator=torch.Generator().manual_seed(0))


def tiny_mixtral():
    torch.manual_seed(0)
    return T.MixtralForCausalLM(T.MixtralConfig(
        vocab_size=128, hidden_size=H, intermediate_size=F, num_hidden_layers=LAYERS, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, num_local_experts=E, num_experts_per_tok=2)).eval()


def logits(model):
    with torch.no_grad():
        return model.eval()(input_ids=IDS).logits


def ranks(model) -> dict:
    """(r, scaling) of the default adapter of every LoRA layer, ParamWrappers included."""
    return {name: (layer.r["default"], layer.scaling["default"]) for name, layer in model.named_modules()
            if isinstance(layer, LoraLayer)}


def quiet(build, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build(*args, **kwargs)


def dequantized_twin(quantized):
    twin = copy.deepcopy(quantized)
    for name, module in list(twin.named_modules()):
        if isinstance(module, NF4Linear):
            twin.set_submodule(name, module.to_linear(torch.float32))
    return twin


EXPERTS = "base_model.model.model.layers.0.mlp.experts"  # ParamWrapper of down_proj; its base_layer: gate_up_proj
ROUTER = "base_model.model.model.layers.0.mlp.gate"

# ------------------------------------------------------ 1. rank/alpha pattern keys naming a targeted parameter

PATTERN_CASES = {  # config, then (layer, (r, scaling)) the pattern must give there (r=4, lora_alpha=8 elsewhere)
    "all_linear_fused_and_down": (dict(target_modules="all-linear", rank_pattern={"experts.gate_up_proj": 2},
                                       alpha_pattern={"down_proj": 32}),
                                  {f"{EXPERTS}.base_layer": (2, 8.0), EXPERTS: (4, 8.0)}),
    "v4_names_fused_key": (dict(target_modules=["q_proj", "w1", "w2", "w3"], rank_pattern={"gate_up_proj": 2}),
                           {f"{EXPERTS}.base_layer": (2, 8.0)}),
    "router_weight_and_regex": (dict(target_modules="all-linear", rank_pattern={"gate.weight": 2},
                                     alpha_pattern={r"layers\.0\.mlp\.experts\.down_proj": 16}),
                                {ROUTER: (2, 4.0), EXPERTS: (4, 4.0)}),
}


@pytest.mark.parametrize("quantize", [False, True])
@pytest.mark.parametrize("case", PATTERN_CASES)
def test_pattern_keys_naming_a_targeted_parameter_give_the_ranks_and_scalings_peft_gives(case, quantize):
    kwargs, expected = PATTERN_CASES[case]
    config = LoraConfig(r=4, lora_alpha=8, **kwargs)
    base = fastft.quantize_model(tiny_mixtral(), "nf4") if quantize else tiny_mixtral()
    ref = quiet(peft.get_peft_model, dequantized_twin(base) if quantize else tiny_mixtral(), copy.deepcopy(config))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours = fastft.get_peft_model(base, copy.deepcopy(config))
    assert ranks(ours) == ranks(ref)
    assert {name: ranks(ours)[name] for name in expected} == expected  # the pattern took effect
    # peft's "pattern keys did not match any targeted module" looks at modules only: untrue here, not passed on
    assert not [w for w in caught if "pattern keys did not match" in str(w.message)]


def test_pattern_keys_through_add_adapter_give_the_ranks_peft_gives():
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "w1", "w2", "w3"],
                        rank_pattern={"experts.down_proj": 2})
    ours = fastft.get_peft_model(tiny_mixtral(), LoraConfig(r=4, target_modules=["q_proj", "w1", "w2", "w3"]))
    fastft.add_adapter(ours, "second", copy.deepcopy(config))
    ref = quiet(peft.get_peft_model, tiny_mixtral(), LoraConfig(r=4, target_modules=["q_proj", "w1", "w2", "w3"]))
    quiet(ref.add_adapter, "second", copy.deepcopy(config))
    second = {n: (m.r["second"], m.scaling["second"]) for n, m in ours.named_modules() if isinstance(m, LoraLayer)}
    assert second == {n: (m.r["second"], m.scaling["second"]) for n, m in ref.named_modules()
                      if isinstance(m, LoraLayer)}
    assert second[EXPERTS] == (2, 4.0)


@pytest.mark.parametrize("key, hint", [
    ("w1", r"nor parameters \(LoRA on parameters: \['experts\.down_proj', 'experts\.gate_up_proj', 'gate\.weight'\]"),
    ("gate", r"did you mean 'gate\.weight'\?"),  # the router is adapted as its parameter 'mlp.gate.weight'
    ("experts.gate_up", r"a key matches the end of .<module>.<parameter>.\); fix the key or drop it"),
])
def test_pattern_keys_that_peft_would_ignore_are_refused_naming_the_parameters(key, hint):
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", rank_pattern={key: 2})
    by_peft = quiet(peft.get_peft_model, tiny_mixtral(), copy.deepcopy(config))
    plain = quiet(peft.get_peft_model, tiny_mixtral(), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    assert ranks(by_peft) == ranks(plain)  # peft ignores the key: fastft names it
    with pytest.raises(ValueError, match=rf"LoraConfig\.rank_pattern key '{key}' matches none .*{hint}"):
        fastft.get_peft_model(tiny_mixtral(), copy.deepcopy(config))


# ------------------------------------------------- 2. transformers 4 target names, as peft converts them

def test_transformers4_expert_names_target_what_peft_targets():
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnmatchedTargetWarning)  # 'w1'.. are converted, not unmatched
        ours = fastft.get_peft_model(tiny_mixtral(), LoraConfig(r=4, target_modules=["q_proj", "w1", "w2", "w3"]))
    ref = quiet(peft.get_peft_model, tiny_mixtral(), LoraConfig(r=4, target_modules=["q_proj", "w1", "w2", "w3"]))
    assert ranks(ours) == ranks(ref) and f"{EXPERTS}.base_layer" in ranks(ours)
    experts_only = quiet(fastft.get_peft_model, tiny_mixtral(), LoraConfig(r=4, target_modules=["w1", "w3"]))
    assert set(ranks(experts_only)) == {EXPERTS, EXPERTS.replace("layers.0", "layers.1")}


def test_layers_to_transform_that_peft_does_not_apply_to_parameters_is_said():
    """peft adapts the experts (target_parameters) of every layer whatever layers_to_transform says: the same
    adapter, with a warning that names the parameters outside the layers and the way to keep to them."""
    config = LoraConfig(r=4, target_modules=["q_proj", "w1", "w2", "w3"], layers_to_transform=[0])
    with pytest.warns(UserWarning, match=r"layers_to_transform=\[0\] does not apply to the parameters peft adapts "
                                         r"through target_parameters: 2 outside those layers .*layers\.1\.mlp"):
        ours = fastft.get_peft_model(tiny_mixtral(), copy.deepcopy(config))
    ref = quiet(peft.get_peft_model, tiny_mixtral(), copy.deepcopy(config))
    assert ranks(ours) == ranks(ref) and EXPERTS.replace("layers.0", "layers.1") in ranks(ours)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*does not apply to the parameters")
        quiet_layers = LoraConfig(r=4, target_modules=["q_proj"], layers_to_transform=[0])
        fastft.get_peft_model(tiny_mixtral(), quiet_layers)  # modules only: nothing to say


def test_half_of_a_fused_pair_is_refused_naming_the_field_as_peft_refuses_it():
    with pytest.raises(ValueError, match="Cannot convert PEFT target"):
        quiet(peft.get_peft_model, tiny_mixtral(), LoraConfig(r=4, target_modules=["q_proj", "w1"]))
    with pytest.raises(ValueError, match=r"LoraConfig\.target_modules=\['q_proj', 'w1'\] is not supported by fastft: "
                                         r"peft converts it .* Cannot convert PEFT target\(s\) w1 without also "
                                         r"targeting w3"):
        fastft.get_peft_model(tiny_mixtral(), LoraConfig(r=4, target_modules=["q_proj", "w1"]))


def test_default_targets_that_peft_drops_on_mixtral_are_refused_clearly():
    with pytest.raises(ValueError, match="No `target_modules` passed"):  # peft's own, obscure
        quiet(peft.get_peft_model, tiny_mixtral(), LoraConfig(r=4))
    with pytest.raises(ValueError, match=r"target_modules=None: peft's conversion .* pass them explicitly, "
                                         r"target_modules=\['q_proj', 'v_proj'\]"):
        fastft.get_peft_model(tiny_mixtral(), LoraConfig(r=4))


# ------------------------------------------------ 3. an adapter file saved under transformers 4 (per-expert keys)

R, ALPHA = 4, 8


def transformers4_adapter(path, with_router=True) -> dict:
    """The adapter peft saves for Mixtral under transformers 4 (experts as nn.Linear w1/w2/w3 in block_sparse_moe,
    the router as the nn.Linear 'gate'), random; its tensors."""
    g = torch.Generator().manual_seed(1)
    tensors = {}

    def lora(prefix, in_f, out_f):
        tensors[f"{prefix}.lora_A.weight"] = torch.randn(R, in_f, generator=g) * 0.3
        tensors[f"{prefix}.lora_B.weight"] = torch.randn(out_f, R, generator=g) * 0.3

    for layer in range(LAYERS):
        prefix = f"base_model.model.model.layers.{layer}"
        lora(f"{prefix}.self_attn.q_proj", H, H)
        for e in range(E):
            lora(f"{prefix}.block_sparse_moe.experts.{e}.w1", H, F)
            lora(f"{prefix}.block_sparse_moe.experts.{e}.w2", F, H)
            lora(f"{prefix}.block_sparse_moe.experts.{e}.w3", H, F)
        if with_router:
            lora(f"{prefix}.block_sparse_moe.gate", H, E)
    path.mkdir(exist_ok=True)
    save_file(tensors, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
    targets = ["q_proj", "w1", "w2", "w3"] + (["gate"] if with_router else [])
    LoraConfig(r=R, lora_alpha=ALPHA, target_modules=targets).save_pretrained(str(path))
    return tensors


def merged_reference(tensors: dict, with_router=True):
    """The transformers 5 model with each delta s·B·A added to the weight it adapts, by hand: w1 and w3 are the two
    halves of gate_up_proj[e], w2 is down_proj[e]."""
    model, s = tiny_mixtral(), ALPHA / R
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            prefix = f"base_model.model.model.layers.{i}"

            def delta(name):
                return s * tensors[f"{prefix}.{name}.lora_B.weight"] @ tensors[f"{prefix}.{name}.lora_A.weight"]

            layer.self_attn.q_proj.weight += delta("self_attn.q_proj")
            for e in range(E):
                layer.mlp.experts.gate_up_proj[e, :F] += delta(f"block_sparse_moe.experts.{e}.w1")
                layer.mlp.experts.gate_up_proj[e, F:] += delta(f"block_sparse_moe.experts.{e}.w3")
                layer.mlp.experts.down_proj[e] += delta(f"block_sparse_moe.experts.{e}.w2")
            if with_router:
                layer.mlp.gate.weight += delta("block_sparse_moe.gate")
    return model


@pytest.mark.parametrize("with_router", [True, False])
def test_a_transformers4_mixtral_adapter_loads_as_peft_loads_it(tmp_path, with_router):
    tensors = transformers4_adapter(tmp_path, with_router)
    expected = logits(merged_reference(tensors, with_router))
    assert not torch.allclose(expected, logits(tiny_mixtral()), atol=1e-2)
    by_peft = quiet(PeftModel.from_pretrained, tiny_mixtral(), str(tmp_path), is_trainable=True)
    assert torch.allclose(logits(by_peft), expected, rtol=0, atol=1e-5)
    ours = quiet(fastft.load_adapter, tiny_mixtral(), tmp_path, is_trainable=True)
    assert torch.allclose(logits(ours), logits(by_peft), rtol=0, atol=1e-6)
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == {
        n for n, p in by_peft.named_parameters() if p.requires_grad}
    # into a PeftModel that holds another adapter (peft: on the same parameters), and back out through fastft's
    # save, read by peft
    targets = ["q_proj", "w1", "w2", "w3"] + (["gate"] if with_router else [])
    other = quiet(fastft.get_peft_model, tiny_mixtral(), LoraConfig(r=2, target_modules=targets))
    quiet(fastft.load_adapter, other, tmp_path, adapter_name="v4")
    other.set_adapter("v4")
    assert torch.allclose(logits(other), expected, rtol=0, atol=1e-5)
    fastft.save_adapter(ours, tmp_path / "again")
    again = quiet(PeftModel.from_pretrained, tiny_mixtral(), str(tmp_path / "again"))
    assert torch.allclose(logits(again), expected, rtol=0, atol=1e-5)


def test_a_transformers4_mixtral_adapter_loads_onto_an_nf4_base_as_peft_onto_its_dense_twin(tmp_path):
    transformers4_adapter(tmp_path)
    quantized = fastft.quantize_model(tiny_mixtral(), "nf4")
    by_peft = quiet(PeftModel.from_pretrained, dequantized_twin(quantized), str(tmp_path))
    ours = quiet(fastft.load_adapter, quantized, tmp_path)
    assert torch.allclose(logits(ours), logits(by_peft), rtol=1e-5, atol=1e-5)


def _edited(path, tensors=None, targets=None):
    if tensors is not None:
        save_file(tensors(load_file(path / "adapter_model.safetensors")), str(path / "adapter_model.safetensors"))
    if targets is not None:
        config = json.loads((path / "adapter_config.json").read_text())
        (path / "adapter_config.json").write_text(json.dumps({**config, "target_modules": targets}))
    return path


@pytest.mark.parametrize("edit, peft_error, message", [
    (dict(tensors=lambda t: {k: v for k, v in t.items() if ".experts.1.w3." not in k}), RuntimeError,
     r"holds keys of a transformers 4 MixtralForCausalLM \(e\.g\. '.*block_sparse_moe\.experts\.0\.w1\.lora_A\.weight'"
     r"\), which peft converts .* that conversion failed"),
    (dict(targets=["q_proj", "w1", "w2", "gate"]), ValueError,
     r"adapter_config\.json: Cannot convert PEFT target\(s\) w1 without also targeting w3 .* load it with "
     r"transformers 4"),
    (dict(tensors=lambda t: {**t, "base_model.model.model.layers.0.block_sparse_moe.experts.0.w9.lora_A.weight":
                             torch.zeros(R, H)}), None,
     r"has '.*mlp\.experts\.0\.w9\.lora_A\.weight' but MixtralForCausalLM has no module .* \(the key as peft renames "
     r"it converting the file's transformers 4 keys"),
])
def test_a_transformers4_adapter_peft_cannot_convert_is_refused_naming_the_layout(tmp_path, edit, peft_error,
                                                                                 message):
    transformers4_adapter(tmp_path)
    _edited(tmp_path, **edit)
    if peft_error is not None:  # peft fails too, less clearly
        with pytest.raises(peft_error):
            quiet(PeftModel.from_pretrained, tiny_mixtral(), str(tmp_path))
    with pytest.raises(ValueError, match=message):
        fastft.load_adapter(tiny_mixtral(), tmp_path)
