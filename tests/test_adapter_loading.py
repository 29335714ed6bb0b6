"""fastft.load_adapter checks a saved adapter against the model before it builds anything: every method's tensors
and geometry must fit (a clear error naming the file, the field or the module), a failed load leaves the model as
it was, and what peft loads (.bin files, GPT-2's Conv1D layers) fastft loads the same."""
import copy

import peft
import pytest
import torch
from peft import IA3Config, LoraConfig, PeftModel, PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig
from safetensors.torch import load_file, save_file
from torch import nn

import fastft
from fastft import BottleneckAdapterConfig
from fastft.integration.methods.adapter import AdapterAfter
from tests.methods_utils import ids, perturb_trainables
from tests.utils import tiny_llama


def _logits(model):
    with torch.no_grad():
        return model(input_ids=ids()).logits


def _saved(tmp_path, name, config, **model_kw):
    model = fastft.get_peft_model(tiny_llama(**model_kw), config)
    perturb_trainables(model)
    return fastft.save_adapter(model, tmp_path / name)


def _ia3():
    return IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"], task_type="CAUSAL_LM")


@pytest.mark.parametrize("saver", ["peft", "fastft"])
def test_bin_adapter_loads_as_peft_loads_it(tmp_path, saver):
    """safe_serialization=False writes adapter_model.bin: the old loader wanted the .safetensors file only."""
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    model = (peft.get_peft_model if saver == "peft" else fastft.get_peft_model)(tiny_llama(), config)
    perturb_trainables(model)
    (model.save_pretrained if saver == "peft" else lambda p, **kw: fastft.save_adapter(model, p, **kw))(
        str(tmp_path / "bin"), safe_serialization=False)
    assert not (tmp_path / "bin" / "adapter_model.safetensors").exists()
    want = _logits(PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "bin")))
    assert torch.equal(_logits(fastft.load_adapter(tiny_llama(), tmp_path / "bin")), want)
    weights = tmp_path / "bin" / "adapter_model.bin"
    weights.write_bytes(weights.read_bytes()[:200])
    with pytest.raises(ValueError, match="adapter_model.bin .* is corrupt or truncated"):
        fastft.load_adapter(tiny_llama(), tmp_path / "bin")


def test_a_folder_without_weights_names_both_files(tmp_path):
    path = _saved(tmp_path, "a", LoraConfig(r=4, target_modules=["q_proj"]))
    (path / "adapter_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors not found, nor adapter_model.bin"):
        fastft.load_adapter(tiny_llama(), path)


def _tiny_gpt2(**overrides):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = dict(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(GPT2Config(**{**config, **overrides})).eval()


def test_conv1d_adapter_loads_as_peft_loads_it(tmp_path):
    """GPT-2's Conv1D has nx/nf, not in_features/out_features: the old check refused the adapter as 'trained for a
    different model'."""
    config = LoraConfig(r=4, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)
    saved = peft.get_peft_model(_tiny_gpt2(), copy.deepcopy(config))
    perturb_trainables(saved)
    saved.save_pretrained(str(tmp_path / "gpt2"))
    want = _logits(PeftModel.from_pretrained(_tiny_gpt2(), str(tmp_path / "gpt2")))
    assert torch.equal(want, _logits(saved))
    assert torch.equal(_logits(fastft.load_adapter(_tiny_gpt2(), tmp_path / "gpt2")), want)
    with pytest.raises(ValueError, match=r"c_attn.lora_A.weight' in .* has shape \(4, 64\), but module "
                                         r"'transformer.h.0.attn.c_attn' needs \(r, 32\)"):
        fastft.load_adapter(_tiny_gpt2(n_embd=32), tmp_path / "gpt2")


@pytest.mark.parametrize("model_kw, message", [
    (dict(num_hidden_layers=3), r"has 'base_model.model.model.layers.2.mlp.down_proj.ia3_l' but LlamaForCausalLM "
                                r"has no module 'model.layers.2.mlp.down_proj'"),
    (dict(hidden_size=32, intermediate_size=48), r"down_proj.ia3_l' in .* has shape \(1, 48\), but module "
                                                 r"'model.layers.0.mlp.down_proj' needs \(1, 96\): the adapter was "
                                                 r"trained for a different model"),
])
def test_ia3_adapter_for_another_model_is_refused(tmp_path, model_kw, message):
    """The old IA3 loader let peft drop the vectors of modules the model lacks (no error) and failed on a wrong
    shape only after injecting its layers into the caller's model."""
    path = _saved(tmp_path, "ia3", _ia3(), **model_kw)
    base = tiny_llama()
    with pytest.raises(ValueError, match=message):
        fastft.load_adapter(base, path)
    assert type(base.model.layers[0].self_attn.k_proj) is nn.Linear  # untouched
    assert type(fastft.load_adapter(base, _saved(tmp_path, "right", _ia3()))).__name__ == "PeftModelForCausalLM"


def test_ia3_file_missing_a_targeted_module_is_refused(tmp_path):
    path = _saved(tmp_path, "ia3", _ia3())
    weights = load_file(str(path / "adapter_model.safetensors"))
    del weights["base_model.model.model.layers.1.self_attn.k_proj.ia3_l"]
    save_file(weights, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"has no tensors for 1 of the modules its config targets .*"
                                         r"\(model.layers.1.self_attn.k_proj\)"):
        fastft.load_adapter(tiny_llama(), path)


def _prefix():
    return PrefixTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM")


@pytest.mark.parametrize("config, saved_kw, model_kw, message", [
    (_prefix, dict(num_hidden_layers=3), {}, "PrefixTuningConfig with num_layers=3, but LlamaForCausalLM needs "
                                             "num_layers=2"),
    (_prefix, {}, dict(num_hidden_layers=3), "PrefixTuningConfig with num_layers=2, but LlamaForCausalLM needs "
                                             "num_layers=3"),
    (_prefix, {}, dict(num_key_value_heads=4), "PrefixTuningConfig with num_attention_heads=2, but "
                                               "LlamaForCausalLM needs num_attention_heads=4"),
    (lambda: PromptTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM"), {},
     dict(hidden_size=32, intermediate_size=48), "PromptTuningConfig with token_dim=64, but LlamaForCausalLM needs "
                                                 "token_dim=32"),
    (lambda: PromptEncoderConfig(num_virtual_tokens=3, encoder_hidden_size=16, task_type="CAUSAL_LM"), {},
     dict(hidden_size=32, intermediate_size=48), "PromptEncoderConfig with token_dim=64, but LlamaForCausalLM "
                                                 "needs token_dim=32"),
])
def test_prompt_learning_adapter_for_another_geometry_is_refused(tmp_path, config, saved_kw, model_kw, message):
    """The old loaders compared nothing: a 3-layer prefix on 2 layers dropped a layer silently, a 2-layer prefix on
    3 layers failed in the forward with a bare IndexError, a prompt of another width with a size mismatch."""
    path = _saved(tmp_path, "p", config(), **saved_kw)
    with pytest.raises(ValueError, match=f"load_adapter: {path} holds a {message}: the adapter was trained for a "
                                         "different model"):
        fastft.load_adapter(tiny_llama(**model_kw), path)
    fastft.load_adapter(tiny_llama(**saved_kw), path)  # the model it was trained for


@pytest.mark.parametrize("kind", ["lora", "ia3", "prompt", "adapter"])
def test_load_into_a_bottleneck_model_is_refused(tmp_path, kind):
    """The old load_adapter nested a PeftModel around a BottleneckAdapterModel; saving it dropped the bottleneck
    adapters (get_peft_model and apply_method refused the same nesting)."""
    config = {"lora": lambda: LoraConfig(r=4, target_modules=["q_proj"]), "ia3": _ia3,
              "prompt": lambda: PromptTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM"),
              "adapter": lambda: BottleneckAdapterConfig(size=4)}[kind]
    path = _saved(tmp_path, kind, config())
    holder = fastft.get_peft_model(tiny_llama(), BottleneckAdapterConfig(size=8))
    with pytest.raises(TypeError, match="load_adapter: model is already a BottleneckAdapterModel holding adapters"):
        fastft.load_adapter(holder, path)
    assert type(holder).__name__ == "BottleneckAdapterModel"


def test_bottleneck_adapter_into_a_peft_model_is_refused(tmp_path):
    path = _saved(tmp_path, "adapter", BottleneckAdapterConfig(size=4))
    lora = fastft.get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(TypeError, match="bottleneck adapters load into a plain transformers model, not a PeftModel"):
        fastft.load_adapter(lora, path)
    assert not any(isinstance(m, AdapterAfter) for m in lora.modules())


@pytest.mark.parametrize("damage", ["truncated", "other_model"])
def test_failed_bottleneck_load_names_the_file_and_leaves_the_model(tmp_path, damage):
    """The old loader injected the adapters first: a truncated file gave a raw SafetensorError without the path,
    and the caller's model kept the injected adapters, so a retry failed 'already has bottleneck adapters'."""
    config = BottleneckAdapterConfig(size=4, placement="houlsby")
    good = _saved(tmp_path, "good", config)
    if damage == "truncated":
        bad = _saved(tmp_path, "bad", config)
        weights = bad / "adapter_model.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
        message = f"load_adapter: {weights} .* is corrupt or truncated .*save the adapter again"
    else:
        bad = _saved(tmp_path, "bad", config, hidden_size=32, intermediate_size=48)
        message = "has shape .* the adapter was trained for a different model"
    base = tiny_llama()
    base.model.layers[0].mlp.up_proj.weight.requires_grad_(True)
    trainable = {n for n, p in base.named_parameters() if p.requires_grad}
    with pytest.raises(ValueError, match=message):
        fastft.load_adapter(base, bad)
    assert not any(isinstance(m, AdapterAfter) for m in base.modules())
    assert {n for n, p in base.named_parameters() if p.requires_grad} == trainable
    assert sum(isinstance(m, AdapterAfter) for m in fastft.load_adapter(base, good).modules()) == 4


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_decomposing_init_onto_nf4_is_refused_at_load(tmp_path, init):
    """peft runs the adapter's initialisation when it builds the layers; PiSSA/OLoRA decompose the base weight,
    which failed on NF4 with NotImplementedError (aten._linalg_svd) deep in peft."""
    path = _saved(tmp_path, init, LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=init))
    quantized = fastft.quantize_model(tiny_llama(), "nf4")
    with pytest.raises(ValueError, match=f"LoraConfig.init_lora_weights='{init}' .* NF4 here .* load {path} onto "
                                         "the unquantized model"):
        fastft.load_adapter(quantized, path)
    assert not any("lora" in n for n, _ in quantized.named_modules())


def test_lora_file_missing_a_targeted_module_is_refused(tmp_path):
    """peft only warns and leaves those modules at their fresh initialisation (random A, zero B)."""
    path = _saved(tmp_path, "a", LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    weights = load_file(str(path / "adapter_model.safetensors"))
    for key in [k for k in weights if "layers.1.self_attn.v_proj" in k]:
        del weights[key]
    save_file(weights, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"adapter_model.safetensors has no tensors for 1 of the modules its config "
                                         r"targets in LlamaForCausalLM \(model.layers.1.self_attn.v_proj\)"):
        fastft.load_adapter(tiny_llama(), path)
    shallow = _saved(tmp_path, "shallow", LoraConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match=r"has no tensors for 1 .*\(model.layers.2.self_attn.q_proj\)"):
        fastft.load_adapter(tiny_llama(num_hidden_layers=3), shallow)


@pytest.mark.parametrize("extra", [dict(modules_to_save=["lm_head"]), dict(layers_to_transform=[1]),
                                   dict(exclude_modules=["model.layers.0.self_attn.q_proj"])])
def test_complete_lora_files_still_load_as_peft_loads_them(tmp_path, extra):
    """The missing-tensor check targets modules as peft does: modules_to_save, layers_to_transform and
    exclude_modules leave modules without LoRA tensors, rightly."""
    saved = peft.get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], **extra))
    perturb_trainables(saved)
    saved.save_pretrained(str(tmp_path / "a"))
    want = _logits(PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "a")))
    assert torch.equal(_logits(fastft.load_adapter(tiny_llama(), tmp_path / "a")), want)
