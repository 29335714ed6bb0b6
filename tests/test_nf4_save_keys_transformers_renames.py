"""save_nf4_model on models whose transformers load-time renamings change the model's own key names.

Laguna's renaming `mlp.shared_expert.` → `mlp.shared_experts.` is a regex with unescaped dots: it matches the
model's own `mlp.shared_experts` and makes `mlp.shared_experts..gate_proj`; Inkling2's `sconv.weight_proj` →
`sconv.weight_proj.weight` matches its own output. transformers keeps a stored key that is the model's own, but the
bitsandbytes parts of an NF4 weight (`weight.absmax`, `weight.quant_state.bitsandbytes__nf4`, ...) are no model
keys: renamed, they loaded nowhere, and transformers + bitsandbytes left the layer packed without a quant_state
('Parameter' object has no attribute 'quant_state' / "quant_state is required"). Such keys are saved as
transformers' own save writes them (its renamings reversed), and load back in transformers and in load_nf4_model.
"""
import copy
import warnings

import pytest
import torch

import fastft
from fastft.modules.nf4_linear import NF4Linear

transformers = pytest.importorskip("transformers")
pytest.importorskip("transformers.conversion_mapping")
bnb = pytest.importorskip("bitsandbytes")

_COMMON = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               head_dim=16, max_position_embeddings=64, moe_intermediate_size=32, num_experts_per_tok=2)
CONFIGS = {
    "laguna": dict(  # the sparse layer's shared_experts
        intermediate_size=128, shared_expert_intermediate_size=32, num_experts=4, sliding_window=8,
        layer_types=["full_attention", "full_attention"], num_attention_heads_per_layer=[4, 4],
        mlp_layer_types=["dense", "sparse"]),
    "inkling2_text": dict(  # its short convolutions' weight_proj
        unpadded_vocab_size=124, n_routed_experts=4, layer_types=["hybrid_sliding", "hybrid"], eos_token_id=120),
}


def _model(model_type):
    from transformers import CONFIG_MAPPING
    if model_type not in CONFIG_MAPPING:
        pytest.skip(f"transformers {transformers.__version__} has no {model_type}")
    torch.manual_seed(0)
    config = CONFIG_MAPPING[model_type](**_COMMON, **CONFIGS[model_type])
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
    return model


@pytest.mark.parametrize("model_type", list(CONFIGS))
def test_a_save_loads_in_transformers_bitsandbytes_and_load_nf4_model(tmp_path, model_type):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = fastft.quantize_model(_model(model_type), "nf4")
    fastft.save_nf4_model(model, str(tmp_path), compute_dtype=torch.float32)
    ours = {n: m for n, m in model.named_modules() if isinstance(m, NF4Linear)}

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded, info = transformers.AutoModelForCausalLM.from_pretrained(
            str(tmp_path), device_map="cpu", dtype=torch.float32, output_loading_info=True)
    assert not info["unexpected_keys"] and not info["missing_keys"]
    theirs = {n: m for n, m in loaded.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert set(theirs) == set(ours)
    for name, layer in theirs.items():  # every NF4 weight as fastft quantized it, its quant_state with it
        state, weight = getattr(layer.weight, "quant_state", None), ours[name].weight
        assert state is not None, name
        assert torch.equal(layer.weight.data.reshape(-1), weight.packed.reshape(-1)), name
        assert torch.equal(state.absmax, weight.absmax) and tuple(state.shape) == tuple(weight.shape), name

    ids = torch.randint(0, 120, (1, 7))
    with torch.no_grad():
        expected = model(ids).logits
        again = fastft.load_nf4_model(str(tmp_path), dtype=torch.float32)
        assert {n for n, m in again.named_modules() if isinstance(m, NF4Linear)} == set(ours)
        assert torch.equal(again(ids).logits, expected)


def test_keys_the_renamings_leave_alone_keep_their_names():
    from fastft.integration.checkpoint_keys import stored_namer

    model = copy.deepcopy(_model("laguna"))
    stored = stored_namer(model)
    assert stored("model.layers.1.mlp.shared_experts.gate_proj.weight.absmax") == \
        "model.layers.1.mlp.shared_expert.gate_proj.weight.absmax"
    for key in ("model.layers.0.mlp.gate_proj.weight.absmax", "model.layers.1.mlp.gate.weight", "lm_head.weight"):
        assert stored(key) == key
