"""peft's QLoRA recipe — a model transformers loads with `BitsAndBytesConfig(load_in_4bit=True,
bnb_4bit_quant_type="nf4")`, then get_peft_model — ran peft's bitsandbytes LoRA layers under fastft.get_peft_model
(unfused, with a warning that blamed embeddings and convolutions). Its bitsandbytes NF4 layers now become fastft
NF4Linear layers over the same bytes (fastft/integration/nf4_bitsandbytes.py) and train through fastft's QLoRA,
QDoRA and IA3 layers, against peft on a dense model holding bitsandbytes' dequantized weights (bitsandbytes' own CPU
4-bit layer, its scales rounded to bf16, is ~2e-3 off in fp32); FP4 models keep bitsandbytes' layers; a call that
fails leaves the model as it was; saves load back in transformers (audit round 10, docs/fuzz-results.md)."""
import warnings

import bitsandbytes as bnb
import peft
import pytest
import torch
import transformers

import fastft
from fastft.integration.methods.ia3_nf4 import NF4IA3Linear
from fastft.modules.nf4_linear import NF4Linear
from fastft.modules.qlora import FusedQLoraLinear
from tests.bnb_utils import bnb_layers, dequantized_twin, load_bnb
from tests.utils import tiny_llama

IDS = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    # intermediate 128: bitsandbytes' CPU layer wants widths that are multiples of the blocksize
    path = tmp_path_factory.mktemp("tiny")
    tiny_llama(tie_word_embeddings=False, intermediate_size=128).save_pretrained(path)
    return path


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_layers_keep_bitsandbytes_bytes(checkpoint, double_quant, dtype):
    model = load_bnb(checkpoint, double_quant=double_quant, dtype=dtype, compute_dtype=dtype)
    before = {n: (m.weight.data.data_ptr(), bnb.functional.dequantize_4bit(m.weight.data, m.weight.quant_state),
                  m.state_dict()) for n, m in bnb_layers(model).items()}
    assert len(before) == 14
    fastft.quantize_model(model)
    assert not bnb_layers(model)
    for name, (pointer, dense, state) in before.items():
        layer = model.get_submodule(name)
        assert isinstance(layer, NF4Linear)
        assert layer.weight.packed.data_ptr() == pointer  # the same storage, no copy
        assert layer.weight.dtype == dtype and layer.weight.double_quant == double_quant
        assert torch.equal(layer.weight.dequantize(), dense)
        saved = layer.state_dict()
        assert saved.keys() == state.keys()
        for key, value in state.items():
            assert torch.equal(saved[key].reshape(value.shape), value), key


def adapter_config(method):
    if method == "ia3":
        return peft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])
    return peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False,
                           use_dora=method == "dora")


@pytest.mark.parametrize("method", ["lora", "dora", "ia3"])
def test_a_bitsandbytes_model_trains_through_fastft_layers_as_peft_does(checkpoint, method):
    torch.manual_seed(0)
    ours = fastft.get_peft_model(load_bnb(checkpoint), adapter_config(method))
    if method == "ia3":  # peft starts IA3 at ones (the identity): make the vectors do something
        with torch.no_grad():
            for n, p in ours.named_parameters():
                if "ia3_l" in n:
                    p.uniform_(0.5, 1.5)
    fused = FusedQLoraLinear if method != "ia3" else NF4IA3Linear
    assert any(isinstance(m, fused) for m in ours.modules())
    assert not bnb_layers(ours)
    theirs = peft.get_peft_model(dequantized_twin(checkpoint), adapter_config(method))
    adapter = {k: v for k, v in ours.state_dict().items() if "lora_" in k or "ia3_" in k}
    assert not theirs.load_state_dict(adapter, strict=False).unexpected_keys
    out_theirs, out_ours = (m(input_ids=IDS, labels=IDS) for m in (theirs, ours))
    torch.testing.assert_close(out_ours.logits, out_theirs.logits, rtol=1e-5, atol=1e-5)
    out_theirs.loss.backward()
    out_ours.loss.backward()
    grads = {n: p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    assert grads and all(g is not None for g in grads.values())
    trained = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    assert trained.keys() == grads.keys()
    for name, grad in trained.items():
        torch.testing.assert_close(grad, grads[name], rtol=1e-4, atol=1e-6)


def test_the_model_is_a_fastft_nf4_model_after_and_saves_as_bitsandbytes_loads(checkpoint, tmp_path):
    model = load_bnb(checkpoint, double_quant=False)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    wrapped = fastft.get_peft_model(model, peft.LoraConfig(r=4, target_modules="all-linear"))  # B = 0: a no-op
    assert model.hf_quantizer is None and not model.is_loaded_in_4bit and not model.is_quantized
    assert getattr(model.config, "quantization_config", None) is None  # transformers would look for bnb layers
    with torch.no_grad():
        reference = dequantized_twin(checkpoint, double_quant=False)
        torch.testing.assert_close(wrapped(input_ids=IDS).logits, reference(input_ids=IDS).logits, rtol=1e-5, atol=1e-5)
    fastft.save_nf4_model(fastft.merge_and_unload(wrapped, requantize=True), tmp_path)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert len(bnb_layers(reloaded)) == 14
    for key, value in reloaded.state_dict().items():  # the same bytes (a zero adapter merges into nothing)
        assert torch.equal(value.reshape(state[key].shape), state[key]), key


def test_a_layer_bitsandbytes_repacked_for_its_cpu_kernel_is_left_to_bitsandbytes(checkpoint):
    """bitsandbytes' CPU layer (on CPUs with AVX512-BF16) repacks its codes at its first inference forward, its scales
    rounded to bf16; bitsandbytes 0.50's state dict then unpacks an un-nested layer's scales out of order (its own
    dequantize 40% off). Such a model is not taken: fastft says why and leaves it as it is."""
    model = load_bnb(checkpoint, double_quant=False)
    layer = model.model.layers[0].mlp.down_proj
    layer.weight.data, layer.weight.quant_state = bnb.functional._convert_weight_packed_for_cpu(
        layer.weight.data, layer.weight.quant_state)
    with pytest.warns(UserWarning, match=r"down_proj: repacked by bitsandbytes for its CPU kernel"):
        fastft.get_peft_model(model, adapter_config("lora"))
    assert len(bnb_layers(model)) == 14 and model.hf_quantizer is not None
    assert layer.weight.quant_state.packing_format_for_cpu  # not unpacked by a state dict read either


def test_load_adapter_onto_a_bitsandbytes_model(checkpoint, tmp_path):
    torch.manual_seed(0)
    trained = peft.get_peft_model(load_bnb(checkpoint), adapter_config("lora"))
    trained.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(dequantized_twin(checkpoint), tmp_path)
    ours = fastft.load_adapter(load_bnb(checkpoint), tmp_path)
    assert any(isinstance(m, FusedQLoraLinear) for m in ours.modules()) and not bnb_layers(ours)
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=IDS).logits, theirs(input_ids=IDS).logits, rtol=1e-5, atol=1e-5)


def test_gpt2_conv1d_layers_merge_back_into_conv1d(tmp_path):
    """transformers quantizes GPT-2's Conv1D layers transposed, as nn.Linear ones; merged, they are Conv1D again (an
    nn.Linear under a Conv1D's name saves its weight transposed: c_proj, square, loaded back silently wrong)."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=1,
                                     eos_token_id=2)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path / "gpt2")
    model, dense = load_bnb(tmp_path / "gpt2"), dequantized_twin(tmp_path / "gpt2")
    lora = peft.LoraConfig(r=4, target_modules=["c_attn", "c_proj", "c_fc"], init_lora_weights=False)
    ours = fastft.get_peft_model(model, lora)
    assert sum(isinstance(m, FusedQLoraLinear) for m in ours.modules()) == 8
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft: fan_in_fan_out set to True for Conv1D
        theirs = peft.get_peft_model(dense, peft.LoraConfig(r=4, target_modules=["c_attn", "c_proj", "c_fc"]))
    theirs.load_state_dict({k: v for k, v in ours.state_dict().items() if "lora_" in k}, strict=False)
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=IDS).logits, theirs(input_ids=IDS).logits, rtol=1e-5, atol=1e-5)
    merged = fastft.merge_and_unload(ours)
    assert type(merged.transformer.h[0].attn.c_proj).__name__ == "Conv1D"
    merged.save_pretrained(tmp_path / "merged")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    with torch.no_grad():
        expected = theirs(input_ids=IDS).logits
        torch.testing.assert_close(merged(input_ids=IDS).logits, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(reloaded(input_ids=IDS).logits, expected, rtol=1e-5, atol=1e-5)


def test_an_fp4_model_keeps_bitsandbytes_layers_and_says_so(checkpoint):
    theirs = peft.get_peft_model(load_bnb(checkpoint, quant_type="fp4"), adapter_config("lora"))
    with pytest.warns(UserWarning, match=r"14 bitsandbytes layer\(s\) fastft does not read .*quant_type 'fp4'"):
        ours = fastft.get_peft_model(load_bnb(checkpoint, quant_type="fp4"), adapter_config("lora"))
    ours.load_state_dict(theirs.state_dict(), strict=False)
    assert len(bnb_layers(ours)) == 14 and not any(isinstance(m, NF4Linear) for m in ours.modules())
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=IDS).logits, theirs(input_ids=IDS).logits, rtol=0, atol=0)


@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16])
def test_a_compute_dtype_fastft_does_not_follow_is_named(checkpoint, compute_dtype):
    model = load_bnb(checkpoint, dtype=torch.bfloat16, compute_dtype=compute_dtype)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fastft.get_peft_model(model, adapter_config("lora"))
    said = [str(w.message) for w in caught if "bnb_4bit_compute_dtype" in str(w.message)]
    if compute_dtype == torch.bfloat16:  # what fastft computes a bf16 model's layers in
        assert not said
    else:
        assert len(said) == 1 and "bnb_4bit_compute_dtype=torch.float32 over weights quantized from torch.bfloat16" \
            in said[0]


def assert_still_bitsandbytes(model):
    assert len(bnb_layers(model)) == 14 and not any(isinstance(m, NF4Linear) for m in model.modules())
    assert model.hf_quantizer is not None and model.is_loaded_in_4bit and model.is_quantized
    assert model.config.quantization_config.bnb_4bit_quant_type == "nf4"
    assert "save_pretrained" not in vars(model) and "get_memory_footprint" not in vars(model)


def test_a_refused_call_leaves_the_bitsandbytes_model_as_it_was(checkpoint, tmp_path):
    """The layers are swapped before the config is checked: a refusal put them back (a save then wrote NF4 tensors
    under a config without quantization_config, which transformers could not load)."""
    model = load_bnb(checkpoint)
    with pytest.raises(ValueError, match="nonexistent"):
        fastft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["nonexistent"]))
    assert_still_bitsandbytes(model)
    with pytest.raises(ValueError, match="double_quant=True, not the blocksize=64, double_quant=False asked"):
        fastft.quantize_model(model, double_quant=False)
    assert_still_bitsandbytes(model)
    with pytest.raises((ValueError, FileNotFoundError)):
        fastft.load_adapter(model, tmp_path / "no-adapter")
    assert_still_bitsandbytes(model)
    model.save_pretrained(tmp_path / "saved")
    assert len(bnb_layers(transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "saved"))) == 14


def test_a_model_holding_peft_bitsandbytes_layers_is_refused(checkpoint):
    """peft's inject_adapter_in_model (or a PeftModel's inner model): an NF4 layer inside peft's bitsandbytes LoRA
    layer met peft's bitsandbytes merge (AttributeError: 'NF4Weight' object has no attribute 'quant_state')."""
    model = peft.inject_adapter_in_model(peft.LoraConfig(r=4, target_modules=["q_proj"]), load_bnb(checkpoint))
    with pytest.raises(TypeError, match="holds peft adapters; load the bitsandbytes model again"):
        fastft.get_peft_model(model, adapter_config("lora"))
    assert len(bnb_layers(model)) == 14 and model.hf_quantizer is not None


def test_a_classifier_bitsandbytes_quantized_is_refused_naming_its_skip_option():
    config = transformers.BertConfig(vocab_size=128, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                                     intermediate_size=128, num_labels=64)
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config)
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        quantized = transformers.AutoModelForSequenceClassification.from_pretrained(
            folder, dtype=torch.float32, quantization_config=transformers.BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4"))
    assert isinstance(quantized.classifier, bnb.nn.Linear4bit)
    lora = peft.LoraConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS")
    with pytest.raises(ValueError, match=r"llm_int8_skip_modules=\['classifier'\]"):
        fastft.get_peft_model(quantized, lora)
    assert isinstance(quantized.classifier, bnb.nn.Linear4bit) and quantized.hf_quantizer is not None


def test_save_pretrained_of_an_nf4_model_writes_what_transformers_loads(checkpoint, tmp_path):
    """transformers' save_pretrained wrote NF4 tensors under a config without quantization_config (peft's recipe:
    merge_and_unload(requantize=True), then save_pretrained): a checkpoint that did not load. It saves through
    save_nf4_model now; a merged dense model saves as before; options save_nf4_model lacks are refused."""
    torch.manual_seed(0)
    wrapped = fastft.get_peft_model(load_bnb(checkpoint), adapter_config("lora"))
    merged = fastft.merge_and_unload(wrapped, requantize=True)
    assert any(isinstance(m, NF4Linear) for m in merged.modules())
    with pytest.raises(TypeError, match=r"save_nf4_model\(model, path\), which takes no \['max_shard_size'\]"):
        merged.save_pretrained(tmp_path / "sharded", max_shard_size="1MB")
    merged.save_pretrained(tmp_path / "nf4")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "nf4", dtype=torch.float32)
    assert len(bnb_layers(reloaded)) == 14
    for name, layer in bnb_layers(reloaded).items():
        ours = merged.get_submodule(name).weight
        assert torch.equal(bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state),
                           ours.dequantize()), name
    dense = fastft.merge_and_unload(fastft.get_peft_model(fastft.quantize_model(tiny_llama(
        tie_word_embeddings=False, intermediate_size=128)), adapter_config("lora")))
    assert not any(isinstance(m, NF4Linear) for m in dense.modules())
    dense.save_pretrained(tmp_path / "dense", max_shard_size="1MB")  # transformers' own save, its options too
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "dense")
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=IDS).logits, dense(input_ids=IDS).logits, rtol=0, atol=0)


def test_save_pretrained_takes_transformers_defaults_spelled_out(tmp_path):
    model = fastft.quantize_model(tiny_llama(tie_word_embeddings=False, intermediate_size=128))
    model.save_pretrained(tmp_path, push_to_hub=False, safe_serialization=True, is_main_process=True)
    assert len(bnb_layers(transformers.AutoModelForCausalLM.from_pretrained(tmp_path))) == 14
    with pytest.raises(TypeError, match=r"which takes no \['push_to_hub'\]"):
        model.save_pretrained(tmp_path, push_to_hub=True)


def test_the_fsdp_qlora_recipe_shards_the_taken_layers(checkpoint, tmp_path):
    """bnb_4bit_quant_storage=bf16 (FSDP recipes) and fastft.shard_model over 2 ranks (gloo): the loss and gradients
    of the unsharded model, and the gathered adapter saves as the unsharded one's."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(p for p in (str(root), os.environ.get("PYTHONPATH")) if p))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "tests.bnb_fsdp_worker", str(checkpoint), str(tmp_path)]
    done = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["gradients"] == 28 and report["losses"][0] == report["losses"][1]
    assert report["grad_rel_err"] <= 1e-6
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    torch.manual_seed(0)  # the worker's adapter, built alike (not trained: the gathered save is the test)
    fresh = peft.get_peft_model_state_dict(fastft.get_peft_model(load_bnb(checkpoint), adapter_config("lora")))
    assert saved.keys() == fresh.keys() and len(saved) == 28
    assert all(torch.equal(saved[k], v) for k, v in fresh.items())
