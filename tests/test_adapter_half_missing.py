"""An adapter file holding a module's lora_A but not its lora_B (or the reverse) is as incomplete as one missing
both: peft would load it with that tensor at its fresh initialisation (B = 0: the module's update silently lost)."""
import peft
import pytest
from peft import LoraConfig
from safetensors.torch import load_file, save_file

import fastft
from tests.utils import randomize_lora_B, tiny_llama


@pytest.mark.parametrize("dropped", ["lora_A", "lora_B"])
def test_lora_file_missing_one_factor_of_a_module_is_refused(tmp_path, dropped):
    model = fastft.get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    randomize_lora_B(model)
    path = fastft.save_adapter(model, tmp_path / "a")
    weights = load_file(str(path / "adapter_model.safetensors"))
    gone = [k for k in weights if "layers.1.self_attn.v_proj" in k and dropped in k]
    assert len(gone) == 1
    del weights[gone[0]]
    save_file(weights, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"has no tensors for 1 of the modules its config targets .*"
                                         r"\(model.layers.1.self_attn.v_proj\)"):
        fastft.load_adapter(tiny_llama(), path)


def test_parameter_targeted_file_missing_one_factor_is_refused(tmp_path):
    """The same for a target_parameters adapter (peft's ParamWrapper)."""
    config = LoraConfig(r=4, target_modules=[], target_parameters=["mlp.gate_proj.weight"])
    peft.get_peft_model(tiny_llama(), config).save_pretrained(str(tmp_path / "a"))
    path = tmp_path / "a"
    weights = load_file(str(path / "adapter_model.safetensors"))
    gone = [k for k in weights if "layers.1.mlp.gate_proj" in k and "lora_B" in k]
    assert len(gone) == 1, sorted(weights)
    del weights[gone[0]]
    save_file(weights, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"has no tensors for 1 of the modules its config targets"):
        fastft.load_adapter(tiny_llama(), path)
