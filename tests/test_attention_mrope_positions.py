"""attn_implementation="fastft" on text models that hand multimodal RoPE's 3-D positions (3, B, S) to the attention
(Ernie 4.5 VL MoE, GLM-4.5V): every batch without padding crashed in _packed_documents' expand (generate() at its
prefill). 3-D positions carry no document bounds (transformers' masks read none from them either): one document a
row, as sdpa computes."""
import copy

import pytest
import torch

import fastft


def ernie():
    from transformers.models.ernie4_5_vl_moe.configuration_ernie4_5_vl_moe import Ernie4_5_VLMoeTextConfig
    from transformers.models.ernie4_5_vl_moe.modeling_ernie4_5_vl_moe import Ernie4_5_VLMoeTextModel

    config = Ernie4_5_VLMoeTextConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, moe_num_experts=4, moe_k=2, moe_intermediate_size=[32, 32],
        pad_token_id=0, rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [3, 3, 2]})
    return Ernie4_5_VLMoeTextModel(config)


def glm4v_moe():
    from transformers.models.glm4v_moe.configuration_glm4v_moe import Glm4vMoeTextConfig
    from transformers.models.glm4v_moe.modeling_glm4v_moe import Glm4vMoeTextModel

    config = Glm4vMoeTextConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, n_routed_experts=4, num_experts_per_tok=2,
        first_k_dense_replace=1, max_position_embeddings=64, pad_token_id=0, head_dim=16,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3],
                         "partial_rotary_factor": 1.0})
    return Glm4vMoeTextModel(config)


@pytest.mark.parametrize("make", [ernie, glm4v_moe])
@pytest.mark.parametrize("batch, mask", [(2, None), (2, "ones"), (1, None)])
def test_fastft_attention_matches_sdpa_with_3d_positions(make, batch, mask):
    fastft.register_attention()
    torch.manual_seed(0)
    ref = make().eval()
    ref.set_attn_implementation("sdpa")
    fast = copy.deepcopy(ref)
    fast.set_attn_implementation("fastft")
    ids = torch.randint(1, 128, (batch, 10), generator=torch.Generator().manual_seed(1))
    kw = {} if mask is None else {"attention_mask": torch.ones_like(ids)}
    with torch.no_grad():
        want = ref(input_ids=ids, use_cache=False, **kw).last_hidden_state
        got = fast(input_ids=ids, use_cache=False, **kw).last_hidden_state
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
