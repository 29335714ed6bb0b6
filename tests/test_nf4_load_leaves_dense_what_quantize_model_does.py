"""load_nf4_model quantizes the linear layers quantize_model quantizes, no others: an nn.Linear subclass with its own
forward stays dense (quantize_model's rule, and transformers + bitsandbytes', which replaces `type(m) is nn.Linear`
only). A dense checkpoint's load swapped them for NF4Linear: PhiMoE's router (a Linear returning routing weights and
experts) then crashed the forward (too many values to unpack), DeepSeek-V4's grouped o_a_proj got the wrong input
size, and Falcon's FalconLinear layers (all its linear layers) came out NF4 where quantize_model and transformers +
bitsandbytes keep them dense (logits 0.52 apart from the model quantized in memory)."""
import copy
import warnings

import pytest
import torch

import fastft
from fastft.modules.nf4_linear import NF4Linear

transformers = pytest.importorskip("transformers")


def _phimoe():
    return transformers.PhimoeForCausalLM(transformers.PhimoeConfig(
        vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64))


def _falcon():
    return transformers.FalconForCausalLM(transformers.FalconConfig(
        vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64))


@pytest.mark.parametrize("build, layer, quantized", [(_phimoe, "model.layers.0.mlp.router", False),
                                                     (_falcon, "transformer.h.0.self_attention.query_key_value", False)])
def test_a_linear_subclass_loads_as_quantize_model_leaves_it(tmp_path, build, layer, quantized):
    torch.manual_seed(0)
    model = build().eval()
    model.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # quantize_model names what it leaves dense
        expected = fastft.quantize_model(copy.deepcopy(model), "nf4")
    loaded = fastft.load_nf4_model(str(tmp_path), dtype=torch.float32)
    nf4 = {n for n, m in loaded.named_modules() if isinstance(m, NF4Linear)}
    assert nf4 == {n for n, m in expected.named_modules() if isinstance(m, NF4Linear)}
    assert (layer in nf4) == quantized
    ids = torch.randint(0, 96, (2, 9))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, expected(ids).logits)
