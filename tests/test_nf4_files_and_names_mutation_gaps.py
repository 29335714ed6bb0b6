"""NF4 files, quantize_model's skip and peft's name rule: behaviours a mutation run found no test pinning. A skip
given as one string is one name; a list entry names a whole dotted part ("proj" is not "q_proj"); an 8-bit
bitsandbytes checkpoint is refused by load_nf4_model; a model quantized without double quantization is saved as
such; an NF4 checkpoint whose config lost its quantization_config keeps the layers it stores dense; an adapter
loaded for inference is frozen."""
import json
import warnings

import peft
import pytest
import torch
from peft import LoraConfig
from safetensors.torch import save_file

import fastft
from fastft.integration.module_names import names_module
from tests.utils import tiny_llama


def test_a_skip_given_as_one_string_is_one_name():
    model = tiny_llama()
    fastft.quantize_model(model, skip="down_proj")
    mlp = model.model.layers[0].mlp
    assert type(mlp.down_proj) is torch.nn.Linear and type(mlp.up_proj).__name__ == "NF4Linear"


def test_a_list_entry_names_whole_dotted_parts():
    assert names_module("q_proj", "model.layers.0.self_attn.q_proj")
    assert names_module("self_attn.q_proj", "model.layers.0.self_attn.q_proj")
    assert not names_module("proj", "model.layers.0.self_attn.q_proj")
    assert not names_module("attn.q_proj", "model.layers.0.self_attn.q_proj")
    with pytest.raises(ValueError, match="exclude_modules entry 'proj' matches no module"):
        fastft.get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"], exclude_modules=["proj"]))


def test_an_8bit_bitsandbytes_checkpoint_is_refused(tmp_path):
    model = tiny_llama()
    state = {}
    for key, value in model.state_dict().items():
        if key.endswith("proj.weight"):  # as bitsandbytes' Int8Params save: int8 rows and a scale per row
            scale = value.abs().amax(1).clamp(min=1e-8)
            state[key] = torch.round(value / scale[:, None] * 127).to(torch.int8)
            state[key.replace(".weight", ".SCB")] = scale
        else:
            state[key] = value.contiguous()
    model.config.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_8bit": True, "load_in_4bit": False}
    (tmp_path / "config.json").write_text(json.dumps(config))
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"quantized as 'bitsandbytes' \(load_in_4bit=False\); only bitsandbytes "
                                         r"4-bit NF4 checkpoints and dense ones load"):
        fastft.load_nf4_model(tmp_path)


@pytest.mark.parametrize("double_quant", [False, True])
def test_the_saved_config_says_whether_absmax_is_double_quantized(tmp_path, double_quant):
    model = fastft.quantize_model(tiny_llama(), double_quant=double_quant)
    fastft.save_nf4_model(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert config["bnb_4bit_use_double_quant"] is double_quant


def test_an_nf4_checkpoint_without_its_quantization_config_keeps_its_dense_layers(tmp_path):
    model = fastft.quantize_model(tiny_llama(), skip=["down_proj"])
    ids = torch.randint(0, 128, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(input_ids=ids).logits
    fastft.save_nf4_model(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["quantization_config"]  # its NF4 tensors still say it is quantized
    (tmp_path / "config.json").write_text(json.dumps(config))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = fastft.load_nf4_model(tmp_path, dtype=torch.float32)
    assert type(loaded.model.layers[0].mlp.down_proj) is torch.nn.Linear
    assert type(loaded.model.layers[0].mlp.up_proj).__name__ == "NF4Linear"
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, want)


@pytest.mark.parametrize("trainable", [False, True])
def test_an_adapter_loaded_into_a_peft_model_trains_only_when_asked(tmp_path, trainable):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft.get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"])).save_pretrained(tmp_path)
        model = fastft.get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["v_proj"]))
        fastft.load_adapter(model, tmp_path, adapter_name="b", is_trainable=trainable)
    loaded = [p.requires_grad for n, p in model.named_parameters() if ".b." in n]
    assert len(loaded) == 4 and all(g == trainable for g in loaded)
    assert model.peft_config["b"].inference_mode is (not trainable)
