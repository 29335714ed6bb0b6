"""load_nf4_model applies transformers' base_model_prefix rule to the keys as the model's conversions rename them:
NemotronH stores its body as "backbone.*", which the loader renames to the model's "model.*". Judged on the stored
names, the checkpoint would look like a base model's (no "model." key) and every key would get a second "model.";
loaded into the base model (model_cls=NemotronHModel), the prefix comes off the renamed key ("backbone.layers.0"
is "model.layers.0", so "layers.0"), not the stored one, which has no "model." to strip."""
import copy
import warnings

import pytest
import torch

import fastft

transformers = pytest.importorskip("transformers")
pytest.importorskip("transformers.conversion_mapping")


def test_a_checkpoint_stored_under_another_prefix_loads_as_the_model(tmp_path):
    torch.manual_seed(0)
    config = transformers.NemotronHConfig(vocab_size=96, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                          intermediate_size=64, mamba_num_heads=4, mamba_head_dim=16,
                                          ssm_state_size=16, n_groups=1, hybrid_override_pattern="M*", head_dim=16)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(tmp_path)
    from safetensors import safe_open
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        stored = set(f.keys())
    assert "backbone.embeddings.weight" in stored and not any(k.startswith("model.") for k in stored)
    expected = fastft.quantize_model(copy.deepcopy(model), "nf4")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = fastft.load_nf4_model(str(tmp_path), dtype=torch.float32)
    assert not [w for w in caught if "load_nf4_model" in str(w.message)]  # nothing dropped, nothing initialised
    ids = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, expected(ids).logits)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        body = fastft.load_nf4_model(str(tmp_path), model_cls=transformers.NemotronHModel, dtype=torch.float32)
    messages = [str(w.message) for w in caught if "load_nf4_model" in str(w.message)]
    assert len(messages) == 1 and "(dropped): ['lm_head.weight']; newly initialised (train them): []" in messages[0]
    with torch.no_grad():
        assert torch.equal(body(ids).last_hidden_state, expected.model(ids).last_hidden_state)
