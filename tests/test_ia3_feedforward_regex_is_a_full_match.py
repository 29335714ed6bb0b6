"""IA3Config.feedforward_modules given as one string is a regex the WHOLE module name must match (peft's rule): one
that matches only part of the targeted names ("down_proj", not ".*down_proj") scales no module's input in peft, so
fastft refuses it, naming the field, instead of accepting it because some name contains it."""
import pytest
from peft import IA3Config

import fastft
from fastft.integration.methods.ia3 import validate_ia3_config
from tests.utils import tiny_llama


def test_a_feedforward_regex_matching_part_of_a_name_is_refused():
    model = tiny_llama()
    # the message says why (a string is a whole-name regex) and what to give, not "did you mean 'down_proj'?"
    with pytest.raises(ValueError, match=r"IA3Config.feedforward_modules='down_proj' is a string, which peft reads "
                                         r"as a regex the whole module name must match.* \(\['down_proj'\]\) or "
                                         r"a regex of whole names \(r'\.\*\\\.down_proj'\)$"):
        validate_ia3_config(IA3Config(target_modules=r".*\.(v_proj|down_proj)", feedforward_modules="down_proj"),
                            model)
    validate_ia3_config(IA3Config(target_modules=r".*\.(v_proj|down_proj)", feedforward_modules=r".*\.down_proj"),
                        model)
    fastft.get_peft_model(model, IA3Config(target_modules=r".*\.(v_proj|down_proj)",
                                           feedforward_modules=r".*\.down_proj"))
