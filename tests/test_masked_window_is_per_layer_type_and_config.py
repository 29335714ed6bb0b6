"""The window attn_implementation="fastft" gives a layer that passes none (Qwen2-MoE, PhiMoE) comes from the layer's
own type where the config lists types (whatever mask the model built last), else from the causal mask built for
this config in this forward: not from a mask built for another model, nor from an earlier forward's mask once the
window is switched off; and never for a non-causal layer (a cross-attention passes none)."""
import types

import torch
from transformers import AutoModelForCausalLM, PhimoeConfig

import fastft
from fastft.integration.attention import fastft_attention_forward
from fastft.integration.attention_masks import causal_mask_window

H, KV, S, D = 4, 2, 9, 16


def _qkv(seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, H, S, D, generator=g), torch.randn(1, KV, S, D, generator=g),
            torch.randn(1, KV, S, D, generator=g))


def _reference(q, k, v, causal, window=None):
    k, v = k.repeat_interleave(H // KV, 1), v.repeat_interleave(H // KV, 1)
    i, j = torch.arange(S)[:, None], torch.arange(S)[None, :]
    seen = (j <= i) if causal else torch.ones(S, S, dtype=torch.bool)
    if window is not None:
        seen &= (i - j) < window
    scores = (q @ k.transpose(-1, -2) * D ** -0.5).masked_fill(~seen, float("-inf"))
    return (scores.softmax(-1) @ v).transpose(1, 2)


def _module(config, layer_idx=0, causal=True):
    return types.SimpleNamespace(is_causal=causal, layer_idx=layer_idx, config=config)


def _run(module, q, k, v):
    return fastft_attention_forward(module, q, k, v, None, scaling=D ** -0.5, is_causal=module.is_causal)[0]


def test_a_layer_types_window_does_not_depend_on_the_last_mask_built():
    config = types.SimpleNamespace(layer_types=["sliding_attention", "full_attention"], sliding_window=3)
    q, k, v = _qkv()
    torch.testing.assert_close(_run(_module(config, 0), q, k, v), _reference(q, k, v, True, 3))
    torch.testing.assert_close(_run(_module(config, 1), q, k, v), _reference(q, k, v, True))


def test_a_non_causal_layer_gets_no_window_it_was_not_given():
    config = types.SimpleNamespace(layer_types=["sliding_attention"], sliding_window=3)
    q, k, v = _qkv(1)
    torch.testing.assert_close(_run(_module(config, 0, causal=False), q, k, v), _reference(q, k, v, False))


def _phimoe_config(window):
    return PhimoeConfig(vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, intermediate_size=128, max_position_embeddings=128,
                        num_local_experts=4, num_experts_per_tok=2, sliding_window=window)


def _phimoe(window):
    fastft.register_attention()
    torch.manual_seed(0)
    eager = AutoModelForCausalLM.from_config(_phimoe_config(window), attn_implementation="eager").eval()
    fast = AutoModelForCausalLM.from_config(_phimoe_config(window), attn_implementation="fastft").eval()
    assert fast.config is not eager.config
    fast.load_state_dict(eager.state_dict())
    return eager, fast


def test_a_causal_masks_window_is_its_own_configs_and_this_forwards():
    eager, fast = _phimoe(window=4)
    x = torch.randint(3, 200, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        fast(input_ids=x)
    assert causal_mask_window(fast.config) == 4
    assert causal_mask_window(eager.config) is None  # another config: not the window just seen
    q, k, v = _qkv(2)  # a layer of another model, no mask built for it: no window
    torch.testing.assert_close(_run(_module(types.SimpleNamespace()), q, k, v), _reference(q, k, v, True))
    # the window switched off on the same config: the next forward builds a mask with none, and sees every key
    for model in (eager, fast):
        model.config.sliding_window = None
    with torch.no_grad():
        a, b = fast(input_ids=x).logits, eager(input_ids=x).logits
    assert causal_mask_window(fast.config) is None
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
