"""module_names.name_hint keeps difflib's default cutoff (0.6) unless a caller asks for a stricter one: a moderately
mistyped name ('qproject' for q_proj, similarity ~0.71) still gets "did you mean", which a stricter default would
drop for every caller (LoRA target_modules, exclude_modules, modules_to_save, skip entries); cutoff= is honoured."""
import difflib

from fastft.integration.module_names import name_hint

NAMES = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.0.mlp.down_proj",
         "lm_head"]


def test_a_moderate_typo_gets_a_suggestion_by_default():
    ratio = difflib.SequenceMatcher(None, "qproject", "q_proj").ratio()
    assert 0.6 <= ratio < 0.85  # between the default and IA3's stricter cutoff
    assert name_hint("qproject", NAMES) == "did you mean 'q_proj'?"
    assert name_hint("mlp.qproject", NAMES) == "did you mean 'q_proj'?"  # compared by its last part


def test_a_stricter_cutoff_is_honoured():
    hint = name_hint("qproject", NAMES, cutoff=0.85)
    assert not hint.startswith("did you mean") and "q_proj" in hint  # the names listed instead
