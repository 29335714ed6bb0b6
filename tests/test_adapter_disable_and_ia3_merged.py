"""Two integration switches nothing checked with a trained (non-identity) adapter:
- BottleneckAdapterModel.disable_adapter() must give the base model's output (DPO's reference); the only test ran it
  at init, where the adapter is the identity anyway;
- a merged IA3 layer (merge_adapter) must not apply its vector again in the fused forward (peft's forward on a merged
  layer is the base layer alone)."""
import torch
from peft import IA3Config

import fastft
from fastft.integration.methods.adapter import BottleneckAdapterConfig
from tests.methods_utils import fastft_and_peft, ids, perturb_trainables
from tests.utils import assert_close, tiny_llama


def test_disabled_bottleneck_adapter_is_the_base_model():
    ours = fastft.get_peft_model(tiny_llama(), BottleneckAdapterConfig(size=8, placement="houlsby"))
    perturb_trainables(ours)
    batch = ids()
    with torch.no_grad():
        base = tiny_llama()(input_ids=batch).logits
        adapted = ours(input_ids=batch).logits
        with ours.disable_adapter():
            disabled = ours(input_ids=batch).logits
        again = ours(input_ids=batch).logits
    assert (adapted - base).abs().max() > 1e-3  # the trained adapter changes the output
    assert_close(disabled, base, torch.float32, "disable_adapter()")
    assert torch.equal(again, adapted)  # re-enabled on exit


def test_merged_ia3_matches_peft_and_the_unmerged_model():
    def config():
        return IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"],
                         task_type="CAUSAL_LM")

    ours, theirs = fastft_and_peft(config)
    batch = ids()
    with torch.no_grad():
        unmerged = ours(input_ids=batch).logits
        ours.merge_adapter()
        theirs.merge_adapter()
        merged, peft_merged = ours(input_ids=batch).logits, theirs(input_ids=batch).logits
    assert_close(merged, peft_merged, torch.float32, "merged IA3 vs peft")
    assert_close(merged, unmerged, torch.float32, "merged IA3 vs unmerged")
