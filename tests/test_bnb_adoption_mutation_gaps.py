"""Mutation gaps in fastft/integration/nf4_bitsandbytes.py (audit round 11): what the swap of a transformers +
bitsandbytes model's layers must keep, say and undo, beyond tests/test_bitsandbytes_nf4_model_runs_fastft_kernels.py.
Run from the repository root (imports tests.bnb_utils, tests.utils)."""
import warnings

import bitsandbytes as bnb
import peft
import pytest
import torch
import transformers
from torch import nn

import fastft
from fastft.integration.nf4_bitsandbytes import bitsandbytes_nf4_adopted
from fastft.modules.nf4_linear import NF4Linear
from fastft.quant.nf4_weight import quantize_nf4
from tests.bnb_utils import bnb_layers, load_bnb
from tests.utils import tiny_llama

LORA = dict(r=4, target_modules="all-linear")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    tiny_llama(tie_word_embeddings=False, intermediate_size=128).save_pretrained(path)
    return path


def fastft_warnings(call):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = call()
    return result, [str(w.message) for w in caught if str(w.message).startswith("fastft.")]


def test_an_8bit_model_is_named_8bit_at_its_first_layer(checkpoint):
    """Linear8bitLt is one of the kinds looked for, reported as '(8-bit)', naming the first layer (kills: 8-bit
    kind dropped; the 8-bit / 'not quantized yet' reasons swapped; unread[-1])."""
    model = transformers.AutoModelForCausalLM.from_pretrained(
        checkpoint, dtype=torch.float32, quantization_config=transformers.BitsAndBytesConfig(load_in_8bit=True))
    _, said = fastft_warnings(lambda: fastft.get_peft_model(model, peft.LoraConfig(**LORA)))
    expected = ("fastft.get_peft_model: 14 bitsandbytes layer(s) fastft does not read "
                "(model.layers.0.self_attn.q_proj: Linear8bitLt (8-bit))")
    assert any(s.startswith(expected) for s in said), said
    assert model.hf_quantizer is not None and not any(isinstance(m, NF4Linear) for m in model.modules())


def test_the_count_is_of_the_layers_fastft_does_not_read(checkpoint):
    """One repacked layer out of 14: '1 bitsandbytes layer(s)' (kills len(layers) for len(unread))."""
    model = load_bnb(checkpoint, double_quant=False)
    layer = model.model.layers[0].mlp.down_proj
    layer.weight.data, layer.weight.quant_state = bnb.functional._convert_weight_packed_for_cpu(
        layer.weight.data, layer.weight.quant_state)
    _, said = fastft_warnings(lambda: fastft.get_peft_model(model, peft.LoraConfig(**LORA)))
    assert any(s.startswith("fastft.get_peft_model: 1 bitsandbytes layer(s) fastft does not read "
                            "(model.layers.0.mlp.down_proj: repacked") for s in said), said


def test_a_layer_offloaded_to_the_meta_device_is_left_to_bitsandbytes(checkpoint):
    """accelerate's offload leaves a layer's weight on the meta device: not taken, said so (kills the meta check
    dropped)."""
    model = load_bnb(checkpoint)
    layer = model.model.layers[1].mlp.up_proj
    old = layer.weight
    layer.weight = bnb.nn.Params4bit(old.data.to("meta"), requires_grad=False, quant_state=old.quant_state,
                                     quant_type="nf4", bnb_quantized=True)
    assert layer.weight.device.type == "meta"
    _, said = fastft_warnings(lambda: fastft.get_peft_model(model, peft.LoraConfig(**LORA)))
    assert any("(model.layers.1.mlp.up_proj: weights offloaded (on the meta device))" in s for s in said), said
    assert len(bnb_layers(model)) == 14 and model.hf_quantizer is not None


def test_a_layer_registered_under_two_names_becomes_one_nf4_linear_at_both(checkpoint):
    """(kills remove_duplicate=True in bitsandbytes_layers; a new NF4Linear per name)"""
    model = load_bnb(checkpoint)
    model.model.alias = model.model.layers[0].mlp.down_proj  # the same Linear4bit under a second name
    fastft.quantize_model(model)
    assert isinstance(model.model.layers[0].mlp.down_proj, NF4Linear)
    assert model.model.alias is model.model.layers[0].mlp.down_proj
    assert not bnb_layers(model)


@pytest.mark.parametrize("training", [False, True])
def test_the_layers_keep_the_models_train_mode(checkpoint, training):
    """(kills new.train(layer.training) dropped: an eval model got NF4Linears in train mode)"""
    model = load_bnb(checkpoint).train(training)
    fastft.quantize_model(model)
    assert {m.training for m in model.modules()} == {training}


def test_an_accelerate_hook_moves_to_the_new_layer(checkpoint):
    """transformers' device_map dispatch puts accelerate hooks on the layers: the NF4Linear gets the layer's hook
    (kills the hook carry-over dropped)."""
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module

    model = load_bnb(checkpoint)
    layer = model.model.layers[0].self_attn.v_proj
    hook = AlignDevicesHook(execution_device="cpu", io_same_device=True)
    add_hook_to_module(layer, hook)
    fastft.quantize_model(model)
    new = model.model.layers[0].self_attn.v_proj
    assert isinstance(new, NF4Linear) and getattr(new, "_hf_hook", None) is hook
    assert hasattr(new, "_old_forward")  # accelerate wrapped its forward


def test_a_layer_without_a_compute_dtype_is_not_named(checkpoint):
    """bitsandbytes' Linear4bit has compute_dtype None until its first forward picks one: nothing to warn about
    (kills the `compute_dtype is not None` guard dropped)."""
    model = load_bnb(checkpoint)  # fp32 weights, fp32 compute: no warning
    model.model.layers[0].self_attn.q_proj.compute_dtype = None
    _, said = fastft_warnings(lambda: fastft.quantize_model(model))
    assert not [s for s in said if "bnb_4bit_compute_dtype" in s], said


def test_the_compute_dtype_warning_counts_the_differing_layers_and_names_the_first(checkpoint):
    """(kills differ[-1] and len(layers) in _warn_compute_dtype)"""
    model = load_bnb(checkpoint, dtype=torch.bfloat16, compute_dtype=torch.bfloat16)
    model.model.layers[0].self_attn.k_proj.compute_dtype = torch.float32
    model.model.layers[1].mlp.gate_proj.compute_dtype = torch.float32
    _, said = fastft_warnings(lambda: fastft.quantize_model(model))
    said = [s for s in said if "bnb_4bit_compute_dtype" in s]
    assert len(said) == 1 and said[0].startswith(
        "fastft.quantize_model: 2 bitsandbytes layer(s) had bnb_4bit_compute_dtype=torch.float32 over weights "
        "quantized from torch.bfloat16 (model.layers.0.self_attn.k_proj)"), said


def test_quantization_method_is_dropped_and_put_back(checkpoint):
    """transformers' to() refuses a dtype and Trainer skips device placement while quantization_method says
    bitsandbytes: the taken model has none; a refused call puts it back (kills it left out of _drop_quantizer)."""
    model = load_bnb(checkpoint)
    method = model.quantization_method
    assert method is not None
    with pytest.raises(ValueError, match="nonexistent"):
        fastft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["nonexistent"]))
    assert model.quantization_method == method
    fastft.get_peft_model(model, peft.LoraConfig(**LORA))
    assert model.quantization_method is None


def test_an_interrupt_inside_the_block_puts_the_model_back(checkpoint):
    """Ctrl-C (KeyboardInterrupt, a BaseException) during a call leaves the bitsandbytes model as it was (kills
    `except Exception`)."""
    model = load_bnb(checkpoint)
    with pytest.raises(KeyboardInterrupt):
        with bitsandbytes_nf4_adopted(model, "get_peft_model") as count:
            assert count == 14 and not bnb_layers(model)
            raise KeyboardInterrupt
    assert len(bnb_layers(model)) == 14 and model.hf_quantizer is not None and model.is_loaded_in_4bit
    assert "save_pretrained" not in vars(model)


def test_quantize_model_refuses_an_fp4_model_without_the_peft_warning(checkpoint):
    """quantize_model passes warn=False: an FP4 model gets its TypeError, not also get_peft_model's advice about
    peft's bitsandbytes forward (kills the `if not warn` return dropped, warn=True in quantize_model)."""
    model = load_bnb(checkpoint, quant_type="fp4")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(TypeError, match="quantized already by bitsandbytes"):
            fastft.quantize_model(model)
    assert not [w for w in caught if "fastft does not read" in str(w.message)]


def test_the_bias_is_the_layers_own_parameter(tmp_path):
    """A model whose layers have biases (Llama with attention_bias / mlp_bias): the NF4Linear holds the same bias
    Parameter (kills `new.bias = layer.bias` dropped; GPT-2's zero-initialised biases hid it)."""
    tiny_llama(tie_word_embeddings=False, intermediate_size=128, attention_bias=True, mlp_bias=True).save_pretrained(
        tmp_path)
    model = load_bnb(tmp_path)
    biases = {n: m.bias for n, m in bnb_layers(model).items()}
    assert all(b is not None for b in biases.values())
    fastft.quantize_model(model)
    assert all(model.get_submodule(n).bias is b for n, b in biases.items())


def test_a_dense_weight_loads_into_a_taken_layer_in_its_layout(checkpoint):
    """The NF4Linear takes the layer's layout (blocksize, double_quant) for what it quantizes on load: a dense
    weight loaded into a layer taken from a double_quant=False model is quantized without double quantization, in
    place (kills double_quant=True for weight.double_quant in _nf4_linear)."""
    model = load_bnb(checkpoint, double_quant=False)
    fastft.quantize_model(model)
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.double_quant is False and layer.blocksize == layer.weight.blocksize
    dense = torch.randn(layer.out_features, layer.in_features)
    layer.load_state_dict({"weight": dense})
    assert layer.weight.double_quant is False
    torch.testing.assert_close(layer.weight.dequantize(), quantize_nf4(
        dense, blocksize=64, double_quant=False).dequantize())


def test_a_dense_model_is_not_touched_by_the_swap():
    """No bitsandbytes layer (bitsandbytes imported): get_peft_model installs nothing on the base model and
    refuses nothing the dense path takes (kills the `if not layers: return 0` early return dropped)."""
    assert bnb  # imported: bitsandbytes_layers looks
    model = tiny_llama()
    fastft.get_peft_model(model, peft.LoraConfig(**LORA))
    assert "save_pretrained" not in vars(model) and "get_memory_footprint" not in vars(model)


def test_a_llama_layer_stays_an_nn_linear_when_merged(checkpoint):
    """transformers records source_cls on every layer it quantizes (nn.Linear for Llama's): only a Conv1D one is
    from_conv1d; a Llama merges back into nn.Linear layers (kills the issubclass(source, Conv1D) test dropped)."""
    model = load_bnb(checkpoint)
    assert model.model.layers[0].mlp.down_proj.source_cls is nn.Linear
    merged = fastft.merge_and_unload(fastft.get_peft_model(model, peft.LoraConfig(**LORA)))
    assert type(merged.model.layers[0].mlp.down_proj) is nn.Linear
    assert type(merged.model.layers[1].self_attn.q_proj) is nn.Linear


def test_a_bitsandbytes_model_inside_a_wrapper_loses_its_quantizer_too(checkpoint):
    """A user's module holding the transformers model (a reward model's backbone, say): the quantizer attributes
    are dropped where they are, on the inner model (kills _drop_quantizer clearing only the top module)."""
    outer = nn.Module()
    outer.lm = load_bnb(checkpoint)
    fastft.quantize_model(outer)
    assert not bnb_layers(outer)
    assert outer.lm.hf_quantizer is None and not outer.lm.is_loaded_in_4bit and outer.lm.quantization_method is None


def _warned_here(call, starts: str):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        call()
    ours = [w for w in caught if str(w.message).startswith(starts)]
    assert ours, [str(w.message) for w in caught]
    return [(w.filename, w.lineno) for w in ours]


def test_the_warnings_point_at_the_user_s_call(checkpoint, tmp_path):
    """The swap runs inside a context manager, at a depth that differs per entry point: a fixed stacklevel named
    contextlib.py or fastft's own file instead of the line that called fastft."""
    fastft.get_peft_model(tiny_llama(tie_word_embeddings=False, intermediate_size=128),
                          peft.LoraConfig(**LORA)).save_pretrained(tmp_path / "adapter")
    fp4 = load_bnb(checkpoint, quant_type="fp4")
    for call, who in ((lambda: fastft.get_peft_model(fp4, peft.LoraConfig(**LORA)), "get_peft_model"),
                      (lambda: fastft.load_adapter(load_bnb(checkpoint, quant_type="fp4"), tmp_path / "adapter"),
                       "load_adapter")):
        assert {f for f, _ in _warned_here(call, f"fastft.{who}: 14 bitsandbytes layer(s) fastft does not read")} \
            == {__file__}
    for call, who in ((lambda: fastft.quantize_model(load_bnb(checkpoint, dtype=torch.bfloat16,
                                                              compute_dtype=torch.float32)), "quantize_model"),
                      (lambda: fastft.get_peft_model(load_bnb(checkpoint, dtype=torch.bfloat16,
                                                              compute_dtype=torch.float32),
                                                     peft.LoraConfig(**LORA)), "get_peft_model")):
        assert {f for f, _ in _warned_here(call, f"fastft.{who}: 14 bitsandbytes layer(s) had")} == {__file__}
