"""A DoRA adapter file missing a layer's lora_magnitude_vector, or a LoRA file missing an embedding's
lora_embedding_A/B, loaded with only peft's warning: the layer restarted at its fresh m = ‖W‖ or B = 0 (logits 0.1
and 0.03 off the saved model). Refused naming the file and the module, as a missing lora_A/lora_B is; their shapes
are checked against the module too."""
import pytest
import torch
from peft import LoraConfig
from safetensors.torch import load_file, save_file

import fastft
from tests.utils import randomize_lora_B, tiny_llama


def _saved(tmp_path, **config):
    model = fastft.get_peft_model(tiny_llama(), LoraConfig(r=4, **config))
    randomize_lora_B(model)
    return model, fastft.save_adapter(model, tmp_path / "a")


def _rewrite(path, edit):
    file = str(path / "adapter_model.safetensors")
    weights = load_file(file)
    edit(weights)
    save_file(weights, file, metadata={"format": "pt"})


@pytest.mark.parametrize("config, module, tail", [
    (dict(target_modules=["q_proj", "v_proj"], use_dora=True), "layers.1.self_attn.v_proj", "lora_magnitude_vector"),
    (dict(target_modules=["q_proj", "embed_tokens"]), "embed_tokens", "lora_embedding_B"),
    (dict(target_modules=["q_proj", "embed_tokens"]), "embed_tokens", "lora_embedding_A"),
    (dict(target_modules=["embed_tokens", "lm_head"], use_dora=True), "embed_tokens", "lora_magnitude_vector"),
])
def test_a_file_missing_a_tensor_peft_would_leave_fresh_is_refused(tmp_path, config, module, tail):
    _, path = _saved(tmp_path, **config)

    def drop(weights):
        gone = [k for k in weights if module in k and k.endswith(tail)]
        assert len(gone) == 1, sorted(weights)
        del weights[gone[0]]

    _rewrite(path, drop)
    with pytest.raises(ValueError, match=rf"has no tensors for 1 of the modules its config targets .*{module}"):
        fastft.load_adapter(tiny_llama(), path)


def test_a_dora_magnitude_of_the_wrong_length_is_refused_naming_the_module(tmp_path):
    _, path = _saved(tmp_path, target_modules=["q_proj"], use_dora=True)

    def shorten(weights):
        key = next(k for k in weights if "layers.0.self_attn.q_proj.lora_magnitude_vector" in k)
        weights[key] = weights[key][:-1].clone()

    _rewrite(path, shorten)
    with pytest.raises(ValueError, match=r"lora_magnitude_vector' in .* has shape \(63,\), but module "
                                         r"'model.layers.0.self_attn.q_proj' needs \(64\)"):
        fastft.load_adapter(tiny_llama(), path)


@pytest.mark.parametrize("config", [dict(target_modules=["q_proj", "embed_tokens"], use_dora=True),
                                    dict(target_modules=["embed_tokens", "lm_head"])])
def test_complete_files_still_load_exactly(tmp_path, config):
    model, path = _saved(tmp_path, **config)
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(0))
    loaded = fastft.load_adapter(tiny_llama(), path)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
