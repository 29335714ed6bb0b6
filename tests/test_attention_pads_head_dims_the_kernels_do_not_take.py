"""attn_implementation="fastft" on head sizes the kernels do not take: multi-head latent attention (DeepSeek-V2/V3,
Kimi-K2, MiniCPM3: q/k 192, v 128) stopped at the first forward ("`k` and `v` must have the same shape"), and head
dims off the kernels' grid (a multiple of 8 in [16, 256]: 20, 4) with "head_dim must be a multiple of 8". q, k and v
are zero-padded to the next size the kernels take and the output cropped, the softmax scale kept (exact, as
transformers' FlashAttention integration pads v): logits and gradients equal eager's (registry sweep round 16)."""
import pytest
import torch
import transformers as T

import fastft


def _deepseek_mla():
    return T.DeepseekV3Config(vocab_size=96, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4,
                              num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1, kv_lora_rank=16,
                              q_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16,
                              n_group=1, topk_group=1, max_position_embeddings=64)


def _llama(head_dim):
    return T.LlamaConfig(vocab_size=96, hidden_size=4 * head_dim, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=head_dim, max_position_embeddings=64)


@pytest.mark.parametrize("config", [_deepseek_mla, lambda: _llama(20), lambda: _llama(4)],
                         ids=["mla-qk24-v16", "head-dim-20", "head-dim-4"])
@pytest.mark.parametrize("padded", [False, True])
def test_logits_and_gradients_equal_eager(config, padded):
    fastft.register_attention()
    torch.manual_seed(0)
    eager = T.AutoModelForCausalLM.from_config(config(), attn_implementation="eager")
    fast = T.AutoModelForCausalLM.from_config(config(), attn_implementation="fastft")
    fast.load_state_dict(eager.state_dict())
    ids = torch.randint(0, 96, (2, 13))
    mask = torch.ones_like(ids)
    if padded:
        mask[1, 9:] = 0
    outs = []
    for model in (eager, fast):
        logits = model(input_ids=ids, attention_mask=mask).logits
        (logits[mask.bool()].square().mean()).backward()
        outs.append((logits[mask.bool()].detach(), {n: p.grad for n, p in model.named_parameters()
                                                    if p.grad is not None}))
    torch.testing.assert_close(outs[1][0], outs[0][0], rtol=1e-5, atol=1e-5)
    assert outs[1][1].keys() == outs[0][1].keys()
    for name, grad in outs[0][1].items():
        torch.testing.assert_close(outs[1][1][name], grad, rtol=1e-4, atol=1e-5, msg=name)
