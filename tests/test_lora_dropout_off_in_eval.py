"""A LoRA model with lora_dropout > 0 put in eval mode drops nothing through the fused forward: outputs are
deterministic and equal peft's own (eval) forward."""
import copy

import peft
import torch
from peft import LoraConfig

import fastft
from fastft.modules.lora import FusedLoraLinear
from tests.utils import randomize_lora_B, tiny_llama


def test_eval_mode_disables_lora_dropout():
    base = tiny_llama()
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.5, target_modules=["q_proj", "v_proj"])
    ref = peft.get_peft_model(copy.deepcopy(base), copy.deepcopy(config))
    randomize_lora_B(ref)
    ours = fastft.get_peft_model(copy.deepcopy(base), copy.deepcopy(config))
    ours.load_state_dict(ref.state_dict())
    assert any(isinstance(m, FusedLoraLinear) for m in ours.modules())
    ref.eval()
    ours.eval()
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = ref(ids).logits
        torch.manual_seed(1)
        a = ours(ids).logits
        torch.manual_seed(2)
        b = ours(ids).logits
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(a, want, rtol=1e-5, atol=1e-5)
