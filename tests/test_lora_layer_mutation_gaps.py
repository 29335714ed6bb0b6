"""LoRA layer rules a mutation run found no test pinning: an fp32 input on a bf16 layer without autocast gets
torch's dtype error as in peft (never fused silently across dtypes); a mixed-adapter batch (peft's adapter_names) runs
each row with its own adapter; modules exclude_modules removes are no targets for the config's checks (with peft
0.21's falsy exclusion marker either rule holds: the check pins the behaviour, not one line)."""
import warnings

import peft
import pytest
import torch
from peft import LoraConfig

import fastft
from tests.utils import randomize_lora_B, tiny_llama


def test_an_fp32_input_on_a_bf16_layer_is_torchs_dtype_error_as_in_peft():
    made = {}
    for name, make in (("fastft", fastft.get_peft_model), ("peft", peft.get_peft_model)):
        model = make(tiny_llama().to(torch.bfloat16), LoraConfig(r=4, target_modules=["q_proj"]))
        made[name] = model.get_base_model().model.layers[0].self_attn.q_proj
    x = torch.randn(2, 64)
    for layer in made.values():
        with pytest.raises(RuntimeError, match="same dtype"):
            layer(x)


def test_a_mixed_adapter_batch_runs_each_row_with_its_adapter():
    def build(make, add):
        model = make(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), adapter_name="a")
        add(model)
        randomize_lora_B(model)
        return model.eval()

    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = build(fastft.get_peft_model, lambda m: fastft.add_adapter(m, "b", config))
        theirs = build(peft.get_peft_model, lambda m: m.add_adapter("b", config))
    theirs.load_state_dict(ours.state_dict())
    ids = torch.randint(0, 128, (3, 8), generator=torch.Generator().manual_seed(0))
    names = ["a", "b", "__base__"]
    with torch.no_grad():
        got = ours(input_ids=ids, adapter_names=names).logits
        want = theirs(input_ids=ids, adapter_names=names).logits
        only_a = ours(input_ids=ids).logits
    assert torch.allclose(got, want, atol=1e-6)
    assert not torch.allclose(got[1], only_a[1])  # row 1 ran adapter b, not the active a


def test_modules_exclude_modules_removes_are_no_targets():
    with pytest.raises(ValueError, match="rank_pattern key 'v_proj' matches none of the targeted modules"):
        fastft.get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                       exclude_modules=["v_proj"], rank_pattern={"v_proj": 8}))
    with pytest.raises(ValueError, match=r"target_modules=\['v_proj'\] matches no module"):
        fastft.get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["v_proj"], exclude_modules=["v_proj"]))
