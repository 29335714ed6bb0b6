"""LoraConfig fields through fastft.get_peft_model, from a review against peft 0.21: an NF4 weight is (out, in) whatever
fan_in_fan_out says (GPT-2 QLoRA/QDoRA, all-NF4 or with some Conv1D left dense), modules_to_save naming an NF4 layer
refused up front, target_modules entries / layers_to_transform indices / layers_pattern that select nothing named,
and refusals that say what to do instead."""
import copy
import warnings

import peft
import pytest
import torch
from peft import LoraConfig, PeftModel
from peft.tuners.tuners_utils import BaseTunerLayer

import fastft
from fastft.integration.lora_config import UnmatchedTargetWarning
from fastft.modules.lora import FusedLoraBase
from fastft.modules.nf4_linear import NF4Linear
from fastft.modules.qlora import FusedQLoraLinear
from fastft.quant import quantize_nf4
from tests.utils import tiny_llama

IDS = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(5))


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                      resid_pdrop=0, embd_pdrop=0, attn_pdrop=0, bos_token_id=0,
                                      eos_token_id=0)).eval()


def dequantized_twin(quantized):
    """The dense GPT-2 with the NF4 layers' values (Conv1D weights are stored (in, out): transposed back)."""
    twin = tiny_gpt2()
    with torch.no_grad():
        for name, layer in quantized.named_modules():
            if isinstance(layer, NF4Linear):
                twin.get_submodule(name).weight.copy_(layer.weight.dequantize(torch.float32).t())
    return twin


def logits(model):
    with torch.no_grad():
        return model.eval()(IDS).logits


def quiet(build, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build(*args, **kwargs)


def peft_pair(skip, config_kw):
    """fastft on an NF4 GPT-2 (`skip` left dense) and peft on its dequantized twin, the same random adapters."""
    quantized = fastft.quantize_model(tiny_gpt2(), skip=skip)
    theirs = quiet(peft.get_peft_model, dequantized_twin(quantized), LoraConfig(**config_kw))
    ours = quiet(fastft.get_peft_model, quantized, LoraConfig(**config_kw))
    g = torch.Generator().manual_seed(1)
    trained = dict(ours.named_parameters())
    with torch.no_grad():
        for name, p in sorted(theirs.named_parameters()):
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
                trained[name].copy_(p)
    return ours, theirs


# ------------------------------------------------------------------ 1+2. an NF4 weight is (out, in), always

CASES = {  # skip: the Conv1D layers left dense; targets reach NF4 layers after a dense Conv1D one (peft's flip)
    "all_nf4_fan_in_fan_out": ((), dict(fan_in_fan_out=True)),
    "mixed_dense_conv1d": (["mlp.c_fc"], {}),
    "mixed_fan_in_fan_out": (["attn.c_proj"], dict(fan_in_fan_out=True)),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("use_dora", [False, True])
def test_gpt2_qlora_layers_run_fused_and_match_peft(case, use_dora):
    skip, extra = CASES[case]
    ours, theirs = peft_pair(skip, dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"],
                                        use_dora=use_dora, **extra))
    layers = [m for m in ours.modules() if isinstance(m, FusedQLoraLinear)]
    assert layers and not any(m.fan_in_fan_out for m in layers)
    assert all(m._adapter_operands(torch.zeros(1, 1), (), {}) is not None for m in layers if not use_dora)  # fused
    assert torch.allclose(logits(ours), logits(theirs), atol=1e-5)
    want = logits(quiet(theirs.merge_and_unload))
    assert torch.allclose(logits(quiet(fastft.merge_and_unload, ours)), want, atol=1e-5)


@pytest.mark.parametrize("case", CASES)
def test_gpt2_qlora_delta_and_merge_adapter_follow_the_nf4_layout(case):
    """get_delta_weight is s·B·A as (out, in); merge_adapter re-quantizes W + ΔW (not W + ΔWᵀ): the NF4
    quantization of peft's merged Conv1D weight, transposed."""
    skip, extra = CASES[case]
    ours, theirs = peft_pair(skip, dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"], **extra))
    nf4 = {name: m for name, m in ours.named_modules() if isinstance(m, FusedQLoraLinear)}
    for name, layer in nf4.items():
        A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        assert torch.allclose(layer.get_delta_weight("default"), layer.scaling["default"] * B @ A, atol=1e-6), name
        assert torch.allclose(layer.get_delta_weight("default"),
                              theirs.get_submodule(name).get_delta_weight("default").t(), atol=1e-6), name
    quiet(ours.merge_adapter)
    quiet(theirs.merge_adapter)
    for name, layer in nf4.items():
        base = layer.get_base_layer().weight
        merged = theirs.get_submodule(name).get_base_layer().weight.detach().t()
        want = quantize_nf4(merged.contiguous(), blocksize=base.blocksize, double_quant=base.double_quant)
        assert torch.equal(base.dequantize(torch.float32), want.dequantize(torch.float32)), name


def test_a_dense_gpt2_dora_adapter_loads_onto_its_nf4_twin(tmp_path):
    """peft saves a GPT-2 adapter with fan_in_fan_out=True (Conv1D): onto the NF4 model it runs as peft on the
    dequantized twin (it crashed at the first forward: QDoRA declined its fused path)."""
    dense = quiet(peft.get_peft_model, tiny_gpt2(), LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"],
                                                               use_dora=True, init_lora_weights=False))
    assert dense.peft_config["default"].fan_in_fan_out
    dense.save_pretrained(tmp_path)
    quantized = fastft.quantize_model(tiny_gpt2())
    want = logits(quiet(PeftModel.from_pretrained, dequantized_twin(quantized), str(tmp_path)))
    loaded = quiet(fastft.load_adapter, quantized, tmp_path)
    assert torch.allclose(logits(loaded), want, atol=1e-5)
    assert torch.allclose(logits(quiet(fastft.merge_and_unload, loaded)), want, atol=1e-5)


# ------------------------------------------------------------------ 3. modules_to_save naming an NF4 layer

def test_modules_to_save_naming_an_nf4_layer_is_refused_before_peft_touches_the_model():
    model = fastft.quantize_model(tiny_llama())
    before = [type(m) for m in model.modules()]
    with pytest.raises(ValueError, match=r"LoraConfig.modules_to_save entry 'o_proj' names "
                                         r"'model.layers.0.self_attn.o_proj', which is or holds an NF4 .*"
                                         r"quantize_model\(model, skip=\['o_proj'\]\)"):
        fastft.get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["o_proj"]))
    assert [type(m) for m in model.modules()] == before
    with pytest.raises(ValueError, match=r"modules_to_save entry 'mlp' names 'model.layers.0.mlp', which is or holds"):
        fastft.get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["mlp"]))
    kept_dense = fastft.quantize_model(tiny_llama(), skip=["o_proj"])  # the way the error names
    trained = fastft.get_peft_model(kept_dense, LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["o_proj"]))
    assert any(p.requires_grad for n, p in trained.named_parameters() if "o_proj.modules_to_save" in n)


def test_an_adapter_saving_an_nf4_layer_whole_is_refused_on_load(tmp_path):
    source = peft.get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["o_proj"]))
    source.save_pretrained(tmp_path)
    model = fastft.quantize_model(tiny_llama())
    with pytest.raises(ValueError, match=r"modules_to_save entry 'o_proj', a whole trained copy of "
                                         r"'model.layers.0.self_attn.o_proj', which is an NF4 .*unquantized model"):
        fastft.load_adapter(model, tmp_path, is_trainable=True)
    assert not any(isinstance(m, BaseTunerLayer) for m in model.modules())


# ------------------------------------------------------------------ 4. entries that select nothing

def adapted(model):
    return sorted(n for n, m in model.named_modules() if isinstance(m, BaseTunerLayer))


def test_a_target_entry_matching_nothing_beside_others_warns_once_naming_it():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours = fastft.get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_porj"]))
    unmatched = [str(w.message) for w in caught if w.category is UnmatchedTargetWarning]
    assert len(unmatched) == 1 and "entries ['v_porj'] match no module of LlamaForCausalLM" in unmatched[0]
    assert "did you mean 'v_proj'?" in unmatched[0] and "'q_proj'" in unmatched[0]  # the layers there are
    assert adapted(ours) == adapted(peft.get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"])))


def test_a_list_naming_several_architectures_is_accepted_as_peft_does():
    generic = ["q_proj", "v_proj", "c_attn"]  # Llama's and GPT-2's names
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours = fastft.get_peft_model(tiny_gpt2(), LoraConfig(r=4, target_modules=generic))
    unmatched = [str(w.message) for w in caught if w.category is UnmatchedTargetWarning]
    assert len(unmatched) == 1 and "['q_proj', 'v_proj'] match no module of GPT2LMHeadModel" in unmatched[0]
    assert "c_attn" in unmatched[0]  # the model's linear (Conv1D) layers are listed
    assert adapted(ours) == adapted(quiet(peft.get_peft_model, tiny_gpt2(), LoraConfig(r=4, target_modules=generic)))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnmatchedTargetWarning)  # every entry matches: no warning
        fastft.get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))


@pytest.mark.parametrize("extra, message", [
    (dict(layers_to_transform=[1, 5]), r"LoraConfig.layers_to_transform=\[1, 5\]: LlamaForCausalLM has no layer 5 "
                                       r".*\(its layer list 'layers': 0..1\).*give indices among them"),
    (dict(layers_to_transform=3), r"layers_to_transform=3: LlamaForCausalLM has no layer 3"),
    (dict(layers_to_transform=[0], layers_pattern="blocks"),
     r"LoraConfig.layers_pattern='blocks' names no layer list .* their layer lists are \['layers'\]"),
    (dict(target_modules=["lm_head"], layers_to_transform=[0]),
     r"layers_to_transform=\[0\]: none of the modules .* sits in a numbered layer list \(e.g. \['lm_head'\]\)"),
])
def test_a_layer_selection_that_selects_nothing_is_named(extra, message):
    """peft drops an index no layer has (while others match) silently, and blames target_modules for a layers_pattern
    that matches no path: fastft names the field, what the model has, and what to do."""
    model = tiny_llama()
    before = [type(m) for m in model.modules()]
    with pytest.raises(ValueError, match=message):
        fastft.get_peft_model(model, LoraConfig(r=4, **{"target_modules": ["q_proj", "v_proj"], **extra}))
    assert [type(m) for m in model.modules()] == before


@pytest.mark.parametrize("extra", [dict(layers_to_transform=[1]), dict(layers_to_transform=1, layers_pattern="layers"),
                                   dict(layers_to_transform=[0, 1], layers_pattern=["blocks", "layers"])])
def test_a_layer_selection_peft_applies_is_accepted(extra):
    config = dict(r=4, target_modules=["q_proj", "v_proj"], **extra)
    ours = fastft.get_peft_model(tiny_llama(), LoraConfig(**config))
    assert adapted(ours) == adapted(peft.get_peft_model(tiny_llama(), LoraConfig(**config)))


# ------------------------------------------------------------------ refusals that say what to do instead

def test_layer_replication_refusal_says_what_is_unsupported_and_the_way_round():
    with pytest.raises(ValueError) as info:
        fastft.get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"], layer_replication=[[0, 2]]))
    message = str(info.value)
    assert "LoraConfig.layer_replication" in message and "copies the model's layers" in message
    assert "LoRA forward" not in message and "fastft.load_adapter" in message


@pytest.mark.parametrize("init", ["eva", "corda", "lora_ga", "loftq"])
def test_an_init_needing_peft_preparation_names_the_way_round(init):
    config = LoraConfig(r=4, target_modules=["q_proj"])
    config.init_lora_weights = init  # corda and loftq configs need packages peft imports lazily
    with pytest.raises(ValueError, match=rf"LoraConfig.init_lora_weights='{init}' .*Instead: .*fastft.load_adapter"):
        fastft.get_peft_model(tiny_llama(), config)


def test_the_way_round_for_an_init_that_rewrites_the_base_trains_as_peft(tmp_path):
    """LoRA-GA (as CorDA and LoftQ) rewrites the base weights: initialised with peft, saved with
    init_lora_weights=True beside its rewritten base, it loads into fastft fused and equal to peft's model."""
    from peft import LoraGAConfig
    from peft.tuners.lora.loraga import preprocess_loraga
    from transformers import AutoModelForCausalLM

    model = tiny_llama()
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights="lora_ga",
                        lora_ga_config=LoraGAConfig())
    quiet(preprocess_loraga, model, config, lambda: model(IDS, labels=IDS).loss.backward())
    initialised = peft.get_peft_model(model, config)
    want = logits(initialised)
    initialised.peft_config["default"].init_lora_weights = True
    initialised.save_pretrained(tmp_path / "adapter")
    copy.deepcopy(initialised).unload().save_pretrained(tmp_path / "base")
    loaded = fastft.load_adapter(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "adapter",
                                 is_trainable=True)
    assert torch.allclose(logits(loaded), want, atol=1e-6)
    assert sum(isinstance(m, FusedLoraBase) for m in loaded.modules()) == 4
    assert all(p.requires_grad for n, p in loaded.named_parameters() if "lora_" in n)
