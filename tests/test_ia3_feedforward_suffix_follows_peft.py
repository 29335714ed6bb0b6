"""peft matches IA3's feedforward_modules list entries as name endings at any character ('proj' ends 'k_proj'),
not only at a dot as target_modules: fastft refused such an entry as "matching none of the modules IA3 targets"
(a peft adapter saved with it could not be loaded). Now accepted as peft builds it, with a warning naming the
layers that scale their input."""
import peft
import pytest
import torch
from peft import IA3Config

import fastft
from tests.methods_utils import assert_same_step, copy_trainables, ids, perturb_trainables, step
from tests.utils import tiny_llama


def config():
    return IA3Config(target_modules=r".*\.(k_proj|v_proj|down_proj)", feedforward_modules=["proj"])


def test_a_name_ending_entry_is_matched_as_peft_matches_it(tmp_path):
    with pytest.warns(UserWarning, match=r"entry 'proj' is no whole module name.*\['down_proj', 'k_proj', 'v_proj'\]"):
        ours = fastft.get_peft_model(tiny_llama(), config())
    theirs = peft.get_peft_model(tiny_llama(), config())
    feedforward = {n for n, m in ours.named_modules() if getattr(m, "is_feedforward", False)}
    assert feedforward == {n for n, m in theirs.named_modules() if getattr(m, "is_feedforward", False)}
    assert len(feedforward) == 6
    perturb_trainables(ours)
    copy_trainables(ours, theirs)
    batch = ids()
    assert_same_step(step(ours, batch), step(theirs, batch), "feedforward_modules=['proj']")
    theirs.save_pretrained(str(tmp_path))
    with pytest.warns(UserWarning, match="entry 'proj'"):
        loaded = fastft.load_adapter(tiny_llama(), tmp_path)
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=batch).logits, theirs(input_ids=batch).logits, atol=1e-5)
