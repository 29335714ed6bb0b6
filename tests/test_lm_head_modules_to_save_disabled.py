"""modules_to_save=["lm_head"] under model.disable_adapter() (e.g. a DPO reference pass): peft runs the original head,
so the fused loss must read the original weight, not the trained copy."""
import peft
import torch
import torch.nn.functional as F
from torch import nn

from fastft.ops.linear_losses import lm_head_cross_entropy


def test_disabled_modules_to_save_head_uses_the_original():
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.lm_head = nn.Linear(8, 8), nn.Linear(8, 13)

    torch.manual_seed(0)
    model = peft.get_peft_model(Model(), peft.LoraConfig(r=2, target_modules=["q"], modules_to_save=["lm_head"]))
    wrapper = model.base_model.model.lm_head
    with torch.no_grad():
        wrapper.modules_to_save["default"].weight.add_(torch.randn(13, 8))  # the trained copy moved away
    hidden, labels = torch.randn(5, 8), torch.randint(0, 13, (5,))
    with torch.no_grad():
        trained = F.cross_entropy(wrapper(hidden), labels)
        assert torch.allclose(lm_head_cross_entropy(hidden, wrapper, labels), trained, rtol=1e-5)
        with model.disable_adapter():
            original = F.cross_entropy(wrapper(hidden), labels)
            loss = lm_head_cross_entropy(hidden, wrapper, labels)
    assert not torch.allclose(original, trained, rtol=1e-3)
    assert torch.allclose(loss, original, rtol=1e-5)
