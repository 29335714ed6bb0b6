"""Bottleneck adapter save format edges: `save_pretrained(path, state_dict=...)` with the wrapper's own keys (as an
FSDP2 gather gives them, `base_model.model.` first) writes the same file as the plain save, one a fresh model loads;
and a saved config with a field this version does not know is refused by name as a ValueError (not a TypeError from
the dataclass)."""
import pytest
import torch
from safetensors.torch import load_file

from fastft.integration.methods.adapter import BottleneckAdapterConfig, get_adapter_model, load_bottleneck_adapter
from fastft.integration.methods.adapter.config import PEFT_TYPE
from fastft.integration.methods.adapter.model import WEIGHTS_NAME
from tests.utils import tiny_llama


def test_a_given_state_dict_is_saved_under_the_adapters_own_keys(tmp_path):
    torch.manual_seed(0)
    wrapped = get_adapter_model(tiny_llama(), BottleneckAdapterConfig(size=4))
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if ".adapter." in name:
                p.normal_()
    wrapped.save_pretrained(tmp_path / "plain")
    gathered = {name: p.detach().clone() for name, p in wrapped.named_parameters()}   # "base_model.model..."
    assert all(name.startswith("base_model.model.") for name in gathered)
    wrapped.save_pretrained(tmp_path / "given", state_dict=gathered)
    plain, given = load_file(tmp_path / "plain" / WEIGHTS_NAME), load_file(tmp_path / "given" / WEIGHTS_NAME)
    assert plain.keys() == given.keys() and all(torch.equal(plain[k], given[k]) for k in plain)
    loaded = load_bottleneck_adapter(tiny_llama(), tmp_path / "given")
    want = wrapped.adapter_state_dict()
    got = loaded.adapter_state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


def test_an_unknown_saved_field_is_named():
    saved = BottleneckAdapterConfig(size=8).to_dict()
    assert saved["peft_type"] == PEFT_TYPE
    with pytest.raises(ValueError, match=r"unknown fields \['reduction_factor'\]"):
        BottleneckAdapterConfig.from_dict({**saved, "reduction_factor": 16})
    assert BottleneckAdapterConfig.from_dict(saved).size == 8


def test_a_load_for_inference_puts_the_model_in_eval_mode(tmp_path):
    get_adapter_model(tiny_llama(), BottleneckAdapterConfig(size=4)).save_pretrained(tmp_path)
    inference = load_bottleneck_adapter(tiny_llama().train(), tmp_path)
    assert not any(m.training for m in inference.modules())          # as peft's from_pretrained(is_trainable=False)
    assert not any(p.requires_grad for p in inference.parameters())
    trainable = load_bottleneck_adapter(tiny_llama().train(), tmp_path, is_trainable=True)
    assert trainable.base_model.training
