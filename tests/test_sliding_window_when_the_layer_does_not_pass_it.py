"""Qwen2-MoE and PhiMoE apply their sliding window through their masks only: their attention modules hand no
`sliding_window` to the attention interface. attn_implementation="fastft" takes the window from the layer's type
(Qwen2-MoE) or from the sliding mask the model built (PhiMoE), as eager does (registry sweep, round 18)."""
import copy
import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM, PhimoeConfig, Qwen2MoeConfig

import fastft

SMALL = dict(vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=128, max_position_embeddings=128)


def _config(name, window):
    if name == "qwen2_moe":  # layer 0 sliding, layer 1 full
        return Qwen2MoeConfig(**SMALL, moe_intermediate_size=32, shared_expert_intermediate_size=32, num_experts=4,
                              num_experts_per_tok=2, use_sliding_window=True, sliding_window=window,
                              max_window_layers=2)
    return PhimoeConfig(**SMALL, num_local_experts=4, num_experts_per_tok=2, sliding_window=window)


def _pair(name, window=4):
    fastft.register_attention()
    torch.manual_seed(0)
    eager = AutoModelForCausalLM.from_config(_config(name, window), attn_implementation="eager").eval()
    fast = AutoModelForCausalLM.from_config(_config(name, window), attn_implementation="fastft").eval()
    fast.load_state_dict(eager.state_dict())
    return eager, fast


@pytest.mark.parametrize("name", ["qwen2_moe", "phimoe"])
@pytest.mark.parametrize("padding", ["none", "left", "right"])
def test_forward_past_the_window_matches_eager(name, padding):
    eager, fast = _pair(name)
    x = torch.randint(3, 200, (2, 14), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(x)
    if padding == "left":
        mask[1, :3] = 0
    elif padding == "right":
        mask[1, 10:] = 0
    with torch.no_grad():
        a = fast(input_ids=x, attention_mask=mask).logits
        b = eager(input_ids=x, attention_mask=mask).logits
    keep = mask.bool()
    torch.testing.assert_close(a[keep], b[keep], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["qwen2_moe", "phimoe"])
@pytest.mark.parametrize("cache", [None, "static"])
def test_generation_past_the_window_matches_eager(name, cache):
    eager, fast = _pair(name)
    x = torch.randint(3, 200, (2, 6), generator=torch.Generator().manual_seed(7))
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)
    if cache:
        kw["cache_implementation"] = cache
    with torch.no_grad():
        a = fast.generate(input_ids=x, attention_mask=torch.ones_like(x), **kw)
        b = eager.generate(input_ids=x, attention_mask=torch.ones_like(x), **kw)
    assert a.tolist() == b.tolist()


@pytest.mark.parametrize("name", ["qwen2_moe", "phimoe"])
def test_prefix_past_the_window_is_refused(name):
    import peft

    eager, _ = _pair(name, window=8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = fastft.get_peft_model(copy.deepcopy(eager), peft.PrefixTuningConfig(task_type="CAUSAL_LM",
                                                                                    num_virtual_tokens=2))
    x = torch.randint(3, 200, (2, 12))
    with pytest.raises(ValueError, match="sliding-window model"):
        model(input_ids=x)
