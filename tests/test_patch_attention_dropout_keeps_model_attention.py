"""patch_model keeps the model's own attention when the config has attention dropout (fastft attention has none):
the summary says so, attn_implementation is unchanged, and unpatching leaves it as it was."""
import fastft
from tests.utils import tiny_llama


def test_attention_dropout_keeps_the_models_attention():
    model = tiny_llama(head_dim=16, attention_dropout=0.1)
    kept = model.config._attn_implementation
    fastft.patch_model(model, backend="torch")
    assert model._fastft_patch.summary["attention"] == f"kept {kept!r}: attention dropout 0.1"
    assert model.config._attn_implementation == kept
    assert model._fastft_patch.summary["rope_attention"] == 2  # the RoPE is still fastft's
    fastft.unpatch_model(model)
    assert model.config._attn_implementation == kept


def test_without_dropout_the_same_model_switches_to_fastft_attention():
    model = tiny_llama(head_dim=16)
    kept = model.config._attn_implementation
    fastft.patch_model(model, backend="torch")
    assert model._fastft_patch.summary["attention"] == "fastft"
    fastft.unpatch_model(model)
    assert model.config._attn_implementation == kept
