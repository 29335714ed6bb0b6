"""gathered_adapter_state (what save_adapter writes of an FSDP2-sharded peft model): every entry named after one of
the model's adapters, and every trainable parameter even when its name holds no adapter's (a layer made trainable by
hand, as modules_to_save would); the frozen base is not gathered. Checked on plain tensors (no process group needed:
a DTensor is gathered first, the selection is the same)."""
import torch
from torch import nn

from fastft.integration.sharded_state import gathered_adapter_state


def test_adapter_entries_and_trainable_parameters_are_gathered_the_frozen_base_is_not():
    model = nn.Module()
    model.peft_config = {"default": object(), "other": object()}
    model.layer = nn.Module()
    model.layer.base = nn.Linear(3, 3)
    model.layer.lora_A = nn.ModuleDict({"default": nn.Linear(3, 2), "other": nn.Linear(3, 2)})
    model.norm = nn.LayerNorm(3)
    for p in model.parameters():
        p.requires_grad_(False)
    model.layer.lora_A["default"].weight.requires_grad_(True)  # "other" is frozen (not active) yet saved
    model.norm.weight.requires_grad_(True)
    state = gathered_adapter_state(model)
    assert sorted(state) == ["layer.lora_A.default.bias", "layer.lora_A.default.weight", "layer.lora_A.other.bias",
                             "layer.lora_A.other.weight", "norm.weight"]
    assert all(not v.requires_grad and v.device.type == "cpu" for v in state.values())
    assert torch.equal(state["norm.weight"], model.norm.weight.detach())
