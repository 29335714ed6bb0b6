"""LoRA on GPT-2's Conv1D layers only: peft's lora.Linear layers with fan_in_fan_out=True, which run peft's own forward.
fastft says that nothing is fused (as for embedding- or conv-only LoRA), rather than staying silent."""
import pytest
from peft import LoraConfig

import fastft
from fastft.modules.lora import FusedLoraLinear


def _tiny_gpt2():
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64)).eval()


def test_conv1d_only_lora_warns_that_nothing_is_fused():
    with pytest.warns(UserWarning, match="no LoRA layer is fused"):
        model = fastft.get_peft_model(_tiny_gpt2(), LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True))
    assert not any(isinstance(m, FusedLoraLinear) and not m.fan_in_fan_out for m in model.modules())
