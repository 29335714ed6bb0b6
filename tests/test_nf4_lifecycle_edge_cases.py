"""NF4 model lifecycle cases a fuzz audit found (2026-12-06):
- quantize_model on a model already NF4 in another layout kept the old layout silently; a bad weight (NaN) in a
  later layer left a half-quantized model that still ran: every target is checked before the first one changes;
- save_nf4_model wrote a PeftModel (or a base holding LoRA layers) as the model, a checkpoint nothing could load;
  it is refused. A bitsandbytes-quantized layer is refused too (its uint8 weight is not a dense one);
- transformers' loader matches llm_int8_skip_modules by suffix at any character: with "classifier" dense,
  DistilBERT's NF4 "pre_classifier" was kept dense on load and failed. The default skip follows transformers' rule
  (pre_classifier stays dense); a user's skip that leaves such a clash warns at save;
- config.json got no architectures (a model built in memory) nor dtype, and bnb_4bit_compute_dtype bf16 for an fp32
  model (bitsandbytes' default is fp32): the model's own dtype now."""
import json

import pytest
import torch
from peft import LoraConfig

import fastft
from fastft.modules.nf4_linear import NF4Linear
from tests.utils import tiny_llama


def _layouts(model):
    return {(m.weight.blocksize, m.weight.double_quant) for m in model.modules() if isinstance(m, NF4Linear)}


def test_quantizing_again_in_another_layout_is_refused_and_alike_is_fine():
    model = fastft.quantize_model(tiny_llama(), "nf4")
    with pytest.raises(ValueError, match=r"already NF4 with blocksize=64, double_quant=True, not the blocksize=128"):
        fastft.quantize_model(model, "nf4", blocksize=128, double_quant=False)
    fastft.quantize_model(model, "nf4")  # the same settings: nothing left to quantize, no error
    assert _layouts(model) == {(64, True)}


def test_a_bad_weight_anywhere_leaves_the_model_untouched():
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[-1].mlp.down_proj.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"down_proj.weight.*non-finite"):
        fastft.quantize_model(model, "nf4")
    assert not any(isinstance(m, NF4Linear) for m in model.modules())


@pytest.mark.parametrize("what", ["peft_model", "base_with_lora"])
def test_saving_a_model_with_adapters_is_refused(tmp_path, what):
    model = fastft.get_peft_model(fastft.quantize_model(tiny_llama(), "nf4"),
                                  LoraConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(TypeError, match="holds peft adapters; save the adapter with fastft.save_adapter"):
        fastft.save_nf4_model(model if what == "peft_model" else model.get_base_model(), str(tmp_path))
    assert not any(tmp_path.iterdir())


def _distilbert_classifier():
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    torch.manual_seed(0)
    return DistilBertForSequenceClassification(DistilBertConfig(
        vocab_size=64, dim=32, hidden_dim=64, n_layers=1, n_heads=2, max_position_embeddings=32)).eval()


def test_the_default_skip_keeps_what_transformers_keeps_and_a_clash_warns(tmp_path):
    from transformers.quantizers.quantizers_utils import should_convert_module

    model = fastft.quantize_model(_distilbert_classifier(), "nf4")
    assert not isinstance(model.pre_classifier, NF4Linear) and not isinstance(model.classifier, NF4Linear)
    fastft.save_nf4_model(model, str(tmp_path / "default"))
    dense = json.loads((tmp_path / "default" / "config.json").read_text())["quantization_config"][
        "llm_int8_skip_modules"]
    nf4 = [n for n, m in model.named_modules() if isinstance(m, NF4Linear)]
    assert nf4 and all(should_convert_module(n, dense) for n in nf4)  # transformers loads every NF4 layer as NF4
    clash = fastft.quantize_model(_distilbert_classifier(), "nf4", skip=["classifier"], use_default_skip=False)
    assert isinstance(clash.pre_classifier, NF4Linear)
    with pytest.warns(UserWarning, match=r"would load pre_classifier dense"):
        fastft.save_nf4_model(clash, str(tmp_path / "clash"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_config_names_the_architecture_dtype_and_compute_dtype(tmp_path, dtype):
    model = fastft.quantize_model(tiny_llama().to(dtype), "nf4")
    model.config.architectures = None  # built in memory
    fastft.save_nf4_model(model, str(tmp_path))
    cfg = json.loads((tmp_path / "config.json").read_text())
    name = str(dtype).removeprefix("torch.")
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["dtype"] == name
    assert cfg["quantization_config"]["bnb_4bit_compute_dtype"] == name
    fastft.save_nf4_model(model, str(tmp_path), compute_dtype=torch.float16)  # as asked
    assert json.loads((tmp_path / "config.json").read_text())["quantization_config"][
        "bnb_4bit_compute_dtype"] == "float16"
