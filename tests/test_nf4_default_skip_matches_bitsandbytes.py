"""quantize_model leaves dense what transformers + bitsandbytes leave dense, matched as transformers matches its
skip list (should_convert_module: the name, a module under it, or a name ending in it): GIT's head is named
`output`, and matching any run of dotted parts kept every layer's `output.dense` dense as well (4 of 25 layers of the
tiny model, silently more memory). A `_keep_in_fp32_modules` entry naming a parameter ("classifier.weight") keeps
its module dense: LongCat-Flash's router reads its classifier's weight itself, which an NF4 weight refused.
One difference is kept on purpose: every module under `lm_head` stays dense (RoBERTa's `lm_head.dense`, which
bitsandbytes quantizes; tests/test_nf4_default_skip_keeps_a_heads_submodules.py)."""
from __future__ import annotations

import copy

import pytest
import torch

import fastft
from fastft.modules.nf4_linear import NF4Linear

transformers = pytest.importorskip("transformers")


def _bitsandbytes_rule(model):
    """The linear layers transformers would quantize for bitsandbytes."""
    from transformers.quantizers.base import HfQuantizer
    from transformers.quantizers.quantizers_utils import should_convert_module

    patterns = HfQuantizer.get_modules_to_not_convert(model, None, model._keep_in_fp32_modules)
    return {n for n, m in model.named_modules() if type(m) is torch.nn.Linear and should_convert_module(n, patterns)}


def _tiny(kind):
    from transformers import AutoModelForCausalLM, GitConfig, LlamaConfig

    if kind == "git":
        config = GitConfig(vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=128, max_position_embeddings=128, tie_word_embeddings=False,
                           vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                              num_attention_heads=4, image_size=32, patch_size=16))
    else:
        config = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize("kind", ["git", "llama"])
def test_the_layers_quantized_are_those_bitsandbytes_quantizes(kind):
    model = _tiny(kind)
    expected = _bitsandbytes_rule(model)
    quantized = fastft.quantize_model(copy.deepcopy(model), "nf4")
    got = {n for n, m in quantized.named_modules() if isinstance(m, NF4Linear)}
    assert got == expected, (sorted(expected - got), sorted(got - expected))
    assert any(n.endswith("output.dense") for n in got) or kind != "git"


def test_a_router_reading_its_classifier_weight_keeps_it_dense():
    from transformers import AutoModelForCausalLM, LongcatFlashConfig

    config = LongcatFlashConfig(vocab_size=300, hidden_size=64, num_layers=2, num_attention_heads=4,
                                num_key_value_heads=4, ffn_hidden_size=128, q_lora_rank=32, kv_lora_rank=16,
                                qk_nope_head_dim=8, qk_rope_head_dim=8, head_dim=8, v_head_dim=16, moe_topk=2,
                                n_routed_experts=4, zero_expert_num=2, expert_ffn_hidden_size=64,
                                max_position_embeddings=128, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    assert "classifier.weight" in model._keep_in_fp32_modules
    fastft.quantize_model(model, "nf4")
    names = [n for n, _ in model.named_modules()]
    assert any(n.endswith("router.classifier") for n in names)
    assert not any(isinstance(m, NF4Linear) for n, m in model.named_modules() if n.endswith("classifier"))
    assert any(isinstance(m, NF4Linear) for m in model.modules())
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.randint(3, 200, (2, 9))).logits).all()


def test_an_unsupported_op_on_an_nf4_weight_says_what_to_do():
    from fastft.quant.nf4_weight import quantize_nf4

    weight = quantize_nf4(torch.randn(8, 64))
    with pytest.raises(NotImplementedError, match=r"fastft's NF4Weight does not support .*skip=\[its name\]"):
        weight.t()
