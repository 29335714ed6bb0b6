"""QLoRA end to end on a tiny random Llama: fastft.quantize_model + fastft.get_peft_model against peft LoRA on
the dequantized (dense) twin, peft's format both ways, merging (dense and re-quantized), training."""
import copy

import peft
import pytest
import torch
from peft import LoraConfig, PeftModel
from torch import nn

import fastft
from fastft.modules.nf4_linear import NF4Linear
from fastft.modules.qlora import FusedQLoraLinear
from fastft.quant import quantize_nf4
from tests.utils import ALL_LINEAR, interpreter_only, randomize_lora_B, tiny_llama

IDS = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(5))
CONFIG = LoraConfig(r=8, lora_alpha=16, target_modules=ALL_LINEAR)


def _qlora(config=CONFIG):
    """(QLoRA model, peft LoRA on the dense dequantized twin) with identical adapters."""
    base = tiny_llama()
    quantized = fastft.quantize_model(copy.deepcopy(base), "nf4")
    dense = copy.deepcopy(base)
    for name, module in quantized.named_modules():
        if isinstance(module, NF4Linear):
            dense.get_submodule(name).weight.data = module.weight.dequantize(torch.float32)
    ours = fastft.get_peft_model(quantized, copy.deepcopy(config))
    randomize_lora_B(ours)
    ref = peft.get_peft_model(dense, copy.deepcopy(config))
    ref.load_state_dict({k: v for k, v in ours.state_dict().items() if "lora_" in k}, strict=False)
    return ours, ref


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits


def test_quantized_model_gets_qlora_layers():
    ours, _ = _qlora()
    layers = [m for m in ours.modules() if isinstance(m, FusedQLoraLinear)]
    assert len(layers) == 2 * len(ALL_LINEAR)
    assert all(isinstance(m.base_layer, NF4Linear) for m in layers)
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)


@pytest.mark.parametrize("use_dora", [False, True])
def test_all_linear_targets_the_quantized_layers_as_peft_does_the_dense_ones(use_dora):
    """The README's QLoRA call (target_modules="all-linear"): every NF4 projection gets an adapter, as peft gives
    every nn.Linear of the dense twin one; lm_head (dense, the output layer) none."""
    config = LoraConfig(r=8, target_modules="all-linear", use_dora=use_dora)
    ours = fastft.get_peft_model(fastft.quantize_model(tiny_llama(), "nf4"), copy.deepcopy(config))
    theirs = peft.get_peft_model(tiny_llama(), copy.deepcopy(config))
    adapted = {n for n, m in ours.named_modules() if hasattr(m, "lora_A") and not isinstance(m, nn.ModuleDict)}
    assert adapted == {n for n, m in theirs.named_modules() if hasattr(m, "lora_A") and not isinstance(m, nn.ModuleDict)}
    assert len(adapted) == 2 * len(ALL_LINEAR)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=interpreter_only)])
def test_forward_and_grads_match_lora_on_the_dense_twin(backend, monkeypatch):
    monkeypatch.setenv("FASTFT_LORA_BACKEND", backend)
    ours, ref = _qlora()
    ours.train(), ref.train()
    loss, loss_ref = ours(IDS, labels=IDS).loss, ref(IDS, labels=IDS).loss
    loss.backward()
    loss_ref.backward()
    assert torch.allclose(loss, loss_ref, rtol=1e-5)
    grads_ref = {n: p.grad for n, p in ref.named_parameters() if p.requires_grad}
    for n, p in ours.named_parameters():
        if p.requires_grad:
            assert torch.allclose(p.grad, grads_ref[n], rtol=1e-4, atol=1e-6), n


def test_adapter_round_trips(tmp_path):
    ours, ref = _qlora()
    expected = _logits(ours)
    fastft.save_adapter(ours, tmp_path / "qlora")
    # into a freshly quantized model through fastft, and into the dense twin through peft
    again = fastft.load_adapter(fastft.quantize_model(tiny_llama(), "nf4"), tmp_path / "qlora")
    assert any(isinstance(m, FusedQLoraLinear) for m in again.modules())
    assert torch.allclose(_logits(again), expected, atol=1e-6)
    by_peft = PeftModel.from_pretrained(copy.deepcopy(ref.get_base_model()), str(tmp_path / "qlora"))
    assert torch.allclose(_logits(by_peft), expected, atol=1e-5)


def test_second_adapter_on_a_qlora_model(tmp_path):
    ours, _ = _qlora()
    fastft.save_adapter(ours, tmp_path / "first")
    fastft.load_adapter(ours, tmp_path / "first", adapter_name="again")
    ours.set_adapter("again")
    expected = _logits(ours)
    ours.set_adapter("default")
    assert torch.allclose(_logits(ours), expected, atol=1e-6)
    fastft.load_adapter(ours, tmp_path / "first", adapter_name="again")  # peft's reload: the same weights again
    ours.set_adapter("again")
    assert torch.allclose(_logits(ours), expected, atol=1e-6)


def test_a_dora_adapter_beside_a_qlora_one_and_a_lora_adapter_beside_a_qdora_one():
    """peft's own DoRA variant cannot read an NF4 weight: the QLoRA layers become DoRA-capable first. Each adapter
    gives what peft gives with the same adapter on the dense twin."""
    dora = LoraConfig(r=4, lora_alpha=8, target_modules=ALL_LINEAR, use_dora=True)
    ours, ref = _qlora()
    fastft.add_adapter(ours, "dora", copy.deepcopy(dora))
    ref.add_adapter("dora", copy.deepcopy(dora))
    randomize_lora_B(ref, seed=4)
    ours.load_state_dict({k: v for k, v in ref.state_dict().items() if "lora_" in k}, strict=False)
    for name in ("dora", "default"):
        ours.set_adapter(name), ref.set_adapter(name)
        assert torch.allclose(_logits(ours), _logits(ref), atol=1e-5), name

    qdora = fastft.get_peft_model(fastft.quantize_model(tiny_llama(), "nf4"), copy.deepcopy(dora))
    fastft.add_adapter(qdora, "plain", copy.deepcopy(CONFIG))
    randomize_lora_B(qdora, seed=5)
    with qdora.disable_adapter():
        base = _logits(qdora)
    qdora.set_adapter("plain")
    assert not torch.allclose(_logits(qdora), base, atol=1e-3)  # the plain LoRA adapter is the one running


def test_all_linear_second_adapter_targets_the_layers_the_first_did():
    config = LoraConfig(r=4, target_modules="all-linear")
    ours = fastft.get_peft_model(fastft.quantize_model(tiny_llama(), "nf4"), copy.deepcopy(config))
    fastft.add_adapter(ours, "second", copy.deepcopy(config))
    layers = [n for n, m in ours.named_modules() if isinstance(m, FusedQLoraLinear)]
    assert len(layers) == 2 * len(ALL_LINEAR)
    assert all("second" in ours.get_submodule(n).lora_A for n in layers)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_inits_that_decompose_the_base_weight_are_refused_on_nf4(init):
    with pytest.raises(ValueError, match=f"LoraConfig.init_lora_weights='{init}'.*NF4"):
        fastft.get_peft_model(fastft.quantize_model(tiny_llama(), "nf4"),
                              LoraConfig(r=4, target_modules=ALL_LINEAR, init_lora_weights=init))


def test_merge_and_unload_dense_is_exact():
    ours, ref = _qlora()
    expected = _logits(ours)
    merged = fastft.merge_and_unload(ours)
    assert not any(isinstance(m, NF4Linear) for m in merged.modules())
    assert isinstance(merged.model.layers[0].self_attn.q_proj, nn.Linear)
    assert torch.allclose(_logits(merged), expected, atol=1e-5)


def test_merge_and_unload_dense_with_some_layers_targeted_saves_a_plain_checkpoint(tmp_path):
    """Layers without an adapter come back dense as well: kept NF4, the merged model saved NF4 keys without a
    quantization_config, which transformers refused to load (fastft train --save-merged with --target-modules)."""
    from transformers import AutoModelForCausalLM

    ours, _ = _qlora(LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    expected = _logits(ours)
    merged = fastft.merge_and_unload(ours)
    assert not any(isinstance(m, NF4Linear) for m in merged.modules())
    assert merged.model.layers[0].mlp.down_proj.weight.dtype == torch.float32
    merged.save_pretrained(str(tmp_path))
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path))
    assert torch.allclose(_logits(reloaded), expected, atol=1e-5)


def test_merge_and_unload_requantized_is_one_more_nf4_rounding():
    ours, ref = _qlora()
    exact = fastft.merge_and_unload(copy.deepcopy(ours))  # dense W + ΔW
    merged = fastft.merge_and_unload(ours, requantize=True)
    layer = merged.model.layers[1].mlp.down_proj
    assert isinstance(layer, NF4Linear)
    expected = quantize_nf4(exact.model.layers[1].mlp.down_proj.weight.detach(), blocksize=64, double_quant=True)
    assert torch.equal(layer.weight.packed, expected.packed)


def test_peft_merge_adapter_requantizes_in_place():
    ours, _ = _qlora()
    layer = ours.base_model.model.model.layers[0].self_attn.v_proj
    before = layer.base_layer.weight.dequantize(torch.float32)
    delta = layer.get_delta_weight("default").float()
    ours.merge_adapter()
    assert layer.merged
    assert torch.equal(layer.base_layer.weight.packed, quantize_nf4(before + delta).packed)
    merged = layer.base_layer.weight.dequantize(torch.float32)
    ours.unmerge_adapter()
    assert not layer.merged
    assert torch.equal(layer.base_layer.weight.packed, quantize_nf4(merged - delta).packed)


def test_qlora_trains():
    ours, _ = _qlora()
    ours.train()
    opt = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(5):
        loss = ours(IDS, labels=IDS).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
