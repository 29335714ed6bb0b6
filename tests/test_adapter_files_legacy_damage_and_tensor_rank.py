"""Adapter files checked before peft loads them: a damaged legacy (pre-1.6 torch.save) adapter_model.bin is named as
corrupt or truncated (its load fails with EOFError or UnpicklingError, not a RuntimeError); a LoRA tensor with
another number of dimensions than its module needs is refused (not only one with other sizes), as is a lora_B for
another output size."""
import pytest
import torch
from peft import LoraConfig
from safetensors.torch import load_file, save_file

import fastft
from fastft.integration.adapter_files import check_adapter_fits
from tests.utils import tiny_llama


def _saved(tmp_path):
    model = fastft.get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    return model, fastft.save_adapter(model, tmp_path / "adapter")


@pytest.mark.parametrize("damage", ["truncated", "cut_short", "garbage"])
def test_a_damaged_legacy_bin_adapter_names_the_file(tmp_path, damage):
    _, path = _saved(tmp_path)
    state = load_file(str(path / "adapter_model.safetensors"))
    (path / "adapter_model.safetensors").unlink()
    weights = path / "adapter_model.bin"
    torch.save(state, weights, _use_new_zipfile_serialization=False)
    data = weights.read_bytes()
    weights.write_bytes({"truncated": data[: len(data) // 2], "cut_short": data[:10], "garbage": b"\x07" * 64}[damage])
    for call in (lambda: fastft.load_adapter(tiny_llama(), path), lambda: check_adapter_fits(tiny_llama(), path)):
        with pytest.raises(ValueError, match="corrupt or truncated") as info:
            call()
        assert str(weights) in str(info.value)


def test_a_lora_tensor_with_another_number_of_dimensions_is_refused(tmp_path):
    _, path = _saved(tmp_path)
    file = path / "adapter_model.safetensors"
    state = load_file(str(file))
    key = next(k for k in sorted(state) if k.endswith("q_proj.lora_A.weight"))
    state[key] = state[key][..., None]  # (r, in, 1): the sizes it has are right
    save_file(state, str(file))
    with pytest.raises(ValueError, match=r"has shape \(4, 64, 1\), but module .* needs \(r, 64\)"):
        check_adapter_fits(tiny_llama(), path)


def test_lora_b_for_another_output_size_is_refused(tmp_path):
    """v_proj of 4 KV heads (out 64) onto one of 2 (out 32): lora_A fits (the same 64 inputs), lora_B does not."""
    other = fastft.get_peft_model(tiny_llama(num_key_value_heads=4), LoraConfig(r=4, target_modules=["v_proj"]))
    path = fastft.save_adapter(other, tmp_path / "other")
    with pytest.raises(ValueError, match=r"lora_B.weight' in .* has shape \(64, 4\), but module .*v_proj' needs "
                                         r"\(32, r\)"):
        check_adapter_fits(tiny_llama(), path)
