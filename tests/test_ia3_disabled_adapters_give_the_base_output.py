"""With its adapters disabled, the fused IA3 layer gives the base model's output, as peft's IA3 does (DPO's reference
pass runs so). Mutation run 18: the fused layer ignoring the disabled flag passed every test. Against peft."""
import torch
from peft import IA3Config

from tests.methods_utils import fastft_and_peft, ids


def test_disabled_ia3_matches_peft():
    ours, theirs = fastft_and_peft(lambda: IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                                                     feedforward_modules=["down_proj"], task_type="CAUSAL_LM"))
    with torch.no_grad(), ours.disable_adapter(), theirs.disable_adapter():
        torch.testing.assert_close(ours(input_ids=ids()).logits, theirs(input_ids=ids()).logits)
