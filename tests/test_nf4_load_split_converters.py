"""load_nf4_model on checkpoints whose transformers conversions split a fused tensor or rename past the model's keys.

- Lara-mini (`linear_attn.in_proj` → in_proj_qkv/z/b/a) and Sarvam-MoE (`query_key_value` → q/k/v): transformers'
  Split sizes the pieces by reading each target's parameter from the model, where the target was already an
  NF4Linear (no parameter): AttributeError. They are read from the dense model's parameters now.
- HRM-Text (`gqkv_proj` → gate/q/k/v, Chunk): only the first target of a split was counted as a checkpoint tensor,
  so the others stayed dense (logits 0.23 off the model quantized in memory).
- DeepSeek-V4: its renaming `.norm.` → `.kv_norm.` (the attention's norms) took the final `model.norm.weight` too;
  transformers keeps a stored key that is the model's own when its renamings lead nowhere (KeyError: lacks
  `model.norm.weight`). Its grouped `o_a_proj` (a Linear subclass with its own forward) stays dense, as
  quantize_model leaves it.
- A transformers + bitsandbytes checkpoint stores such a fused tensor NF4, its packed parts concatenated (the
  quant_state JSON too; transformers cannot load it back either): refused, naming the tensor.
"""
import copy
import warnings

import pytest
import torch

import fastft
from fastft.modules.nf4_linear import NF4Linear

transformers = pytest.importorskip("transformers")
pytest.importorskip("transformers.conversion_mapping")

_COMMON = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, head_dim=16,
               max_position_embeddings=64)
_MOE = dict(moe_intermediate_size=32, num_experts_per_tok=2)
CONFIGS = {  # tiny configs; what transformers converts on loading is in the comment
    "lara_mini": dict(  # Split of linear_attn.in_proj
        num_key_value_heads=2, num_experts=4, shared_expert_intermediate_size=32, sliding_window=8,
        layer_types=["linear_attention", "sliding_attention"], eos_token_id=1, **_MOE),
    "sarvam_moe": dict(  # Split of attention.query_key_value (GQA: unequal pieces)
        num_key_value_heads=2, intermediate_size=128, n_routed_experts=4, n_shared_experts=1, n_group=1,
        topk_group=1, first_k_dense_replace=1, num_nextn_predict_layers=0, **_MOE),
    "deepseek_v4": dict(  # renamings; `model.norm.weight` must keep its name
        num_key_value_heads=2, q_lora_rank=32, qk_rope_head_dim=8, n_routed_experts=4, n_shared_experts=1,
        num_nextn_predict_layers=0, sliding_window=8,
        layer_types=["heavily_compressed_attention", "compressed_sparse_attention"], **_MOE),
    "hrm_text": dict(intermediate_size=128),  # Chunk of attn.gqkv_proj and mlp.gate_up_proj
}


def _model(model_type):
    from transformers import CONFIG_MAPPING
    if model_type not in CONFIG_MAPPING:
        pytest.skip(f"transformers {transformers.__version__} has no {model_type}")
    torch.manual_seed(0)
    config = CONFIG_MAPPING[model_type](**_COMMON, **CONFIGS[model_type])
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # visible weights: every piece of a split differs from its neighbours
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
    return model


def _nf4_layers(model):
    return {n for n, m in model.named_modules() if isinstance(m, NF4Linear)}


@pytest.mark.parametrize("model_type", list(CONFIGS))
def test_a_converted_dense_checkpoint_loads_as_the_model_quantized_in_memory(tmp_path, model_type):
    model = _model(model_type)
    model.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # quantize_model's note on DeepSeek-V4's o_a_proj, left dense
        expected = fastft.quantize_model(copy.deepcopy(model), "nf4")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = fastft.load_nf4_model(str(tmp_path), dtype=torch.float32)
    assert not [w for w in caught if "load_nf4_model" in str(w.message)]  # nothing dropped, nothing initialised
    assert _nf4_layers(loaded) == _nf4_layers(expected)  # every piece of a split quantized, o_a_proj not
    ids = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        logits = loaded(ids).logits
        assert torch.isfinite(logits).all()
        assert torch.equal(logits, expected(ids).logits)


@pytest.mark.parametrize("model_type", ["lara_mini", "hrm_text"])
def test_a_fused_tensor_stored_nf4_is_refused_by_name(tmp_path, model_type):
    pytest.importorskip("bitsandbytes")
    model = _model(model_type)
    model.save_pretrained(tmp_path / "dense")
    config = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                             bnb_4bit_compute_dtype=torch.bfloat16)
    bnb = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "dense", quantization_config=config,
                                                            device_map="cpu", dtype=torch.bfloat16)
    bnb.save_pretrained(tmp_path / "bnb")
    fused = {"lara_mini": "linear_attn.in_proj.weight", "hrm_text": "attn.gqkv_proj.weight"}[model_type]
    with pytest.raises(ValueError, match=rf"'model\.\S*{fused}' is stored NF4 but transformers converts it"):
        fastft.load_nf4_model(str(tmp_path / "bnb"), dtype=torch.bfloat16)
