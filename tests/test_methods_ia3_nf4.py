"""IA3 on NF4 layers (peft + bitsandbytes run it; fastft refused it): against peft's IA3 on a dense twin holding the
dequantized weights — forward and every gradient, several adapters, save/load both ways, merges, a GPT-2 (Conv1D)
model; merging into the NF4 weight itself refused before any layer changes."""
import copy

import peft
import pytest
import torch
from peft import IA3Config

import fastft
from fastft.integration.methods.ia3_nf4 import NF4IA3Linear
from fastft.modules.nf4_linear import NF4Linear
from tests.methods_utils import assert_same_step, copy_trainables, ids, perturb_trainables, step
from tests.utils import assert_close, tiny_llama

SKIP = ["layers.0.self_attn.k_proj"]  # one targeted layer stays dense: a model mixing both kinds


def config():
    return IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])


def nf4_and_dense_twin(model, skip=SKIP):
    """(the model quantized to NF4, a dense copy whose weights are the NF4 weights dequantized)."""
    nf4 = fastft.quantize_model(copy.deepcopy(model), "nf4", skip=skip)
    dense = copy.deepcopy(model)
    with torch.no_grad():
        for name, module in nf4.named_modules():
            if isinstance(module, NF4Linear):
                dense.get_submodule(name).weight.copy_(module.to_linear(torch.float32).weight)
    return nf4, dense


def built_pair(model=None, make_config=config):
    nf4, dense = nf4_and_dense_twin(tiny_llama() if model is None else model)
    ours, theirs = fastft.get_peft_model(nf4, make_config()), peft.get_peft_model(dense, make_config())
    perturb_trainables(ours)
    copy_trainables(ours, theirs)
    return ours, theirs


def test_ia3_on_nf4_matches_peft_on_the_dequantized_weights():
    ours, theirs = built_pair()
    layers = ours.base_model.model.model.layers
    assert isinstance(layers[1].self_attn.k_proj, NF4IA3Linear) and isinstance(layers[0].mlp.down_proj, NF4IA3Linear)
    assert not isinstance(layers[0].self_attn.k_proj, NF4IA3Linear)  # the skipped dense layer: the fused dense one
    assert layers[0].mlp.down_proj.is_feedforward and not layers[1].self_attn.v_proj.is_feedforward
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert trainable == {n for n, p in theirs.named_parameters() if p.requires_grad} and trainable
    batch = ids()
    assert_same_step(step(ours, batch), step(theirs, batch), "IA3 on NF4")
    with ours.disable_adapter(), theirs.disable_adapter(), torch.no_grad():
        assert_close(ours(input_ids=batch).logits, theirs(input_ids=batch).logits, torch.float32, "disabled")


def test_two_adapters_on_nf4_multiply_as_peft_and_add_adapter_works():
    ours, theirs = built_pair()
    ours.add_adapter("second", config())
    theirs.add_adapter("second", config())
    for model in (ours, theirs):
        model.base_model.set_adapter(["default", "second"])
    perturb_trainables(ours, seed=3)
    copy_trainables(ours, theirs)
    assert sum(isinstance(m, NF4IA3Linear) and "second" in m.ia3_l for m in ours.modules()) == 5
    batch = ids()
    assert_same_step(step(ours, batch), step(theirs, batch), "two IA3 adapters on NF4")


def test_ia3_on_nf4_saves_and_loads_both_ways_with_peft(tmp_path):
    ours, theirs = built_pair()
    batch = ids()
    with torch.no_grad():
        want = ours(input_ids=batch).logits
    fastft.save_adapter(ours, tmp_path / "ours")
    nf4, dense = nf4_and_dense_twin(tiny_llama())
    by_peft = peft.PeftModel.from_pretrained(dense, str(tmp_path / "ours"))
    theirs.save_pretrained(str(tmp_path / "theirs"))
    by_fastft = fastft.load_adapter(nf4, tmp_path / "theirs", is_trainable=True)
    assert any(isinstance(m, NF4IA3Linear) for m in by_fastft.modules())
    with torch.no_grad():
        assert_close(by_peft(input_ids=batch).logits, want, torch.float32, "fastft → peft")
        assert_close(by_fastft(input_ids=batch).logits, want, torch.float32, "peft → fastft")
    assert {n for n, p in by_fastft.named_parameters() if p.requires_grad} == \
        {n for n, p in ours.named_parameters() if p.requires_grad}


def test_merging_into_nf4_is_refused_before_any_layer_changes_and_merge_and_unload_is_exact():
    ours, theirs = built_pair()
    batch = ids()
    with torch.no_grad():
        before = ours(input_ids=batch).logits
    dense_k = ours.base_model.model.model.layers[0].self_attn.k_proj  # walked before any NF4 layer
    for merge in (ours.merge_adapter, ours.merge_and_unload):
        with pytest.raises(NotImplementedError, match="merging IA3 into an NF4 weight is not supported"):
            merge()
        assert not dense_k.merged and not any(m.merged for m in ours.modules() if isinstance(m, NF4IA3Linear))
    with torch.no_grad():
        assert torch.equal(ours(input_ids=batch).logits, before)
        merged, want = fastft.merge_and_unload(ours), theirs.merge_and_unload()
        assert not any(isinstance(m, (NF4Linear, NF4IA3Linear)) for m in merged.modules())
        assert_close(merged(input_ids=batch).logits, want(input_ids=batch).logits, torch.float32, "merged")
        assert_close(merged(input_ids=batch).logits, before, torch.float32, "merged vs unmerged")


def test_ia3_on_an_nf4_gpt2_model_conv1d_sources():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=32)).eval()

    def make():
        return IA3Config(target_modules=["c_attn", "mlp.c_proj"], feedforward_modules=["mlp.c_proj"])

    nf4, dense = nf4_and_dense_twin(gpt2, skip=[])
    with torch.no_grad():  # the twin's Conv1D weights are stored (in, out)
        for name, module in nf4.named_modules():
            if isinstance(module, NF4Linear):
                dense.get_submodule(name).weight.copy_(module.to_linear(torch.float32).weight)
    ours, theirs = fastft.get_peft_model(nf4, make()), peft.get_peft_model(dense, make())
    perturb_trainables(ours)
    copy_trainables(ours, theirs)
    batch = ids()
    assert_same_step(step(ours, batch), step(theirs, batch), "IA3 on NF4 GPT-2")
    with torch.no_grad():
        merged, want = fastft.merge_and_unload(ours), theirs.merge_and_unload()
        assert_close(merged(input_ids=batch).logits, want(input_ids=batch).logits, torch.float32, "GPT-2 merged")
