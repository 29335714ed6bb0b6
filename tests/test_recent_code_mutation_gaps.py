"""Gaps a mutation run (120 mutants) over the code of audit rounds 11–12 found: behaviour the suite did not pin down
(offload refusals of add_adapter / load_adapter, prompt learning's generate wrapper beside plain calls and an
instance's own prepare_inputs_for_generation, lora_alpha / num_virtual_tokens checks, FSDP2's one-rank and
past-the-end shards, stored checkpoint names, the patched RMSNorm's weight gradient). Each test is named for what it
checks."""
from __future__ import annotations

import gc
import math
import threading
import warnings
import weakref

import pytest
import torch
from accelerate import cpu_offload, init_empty_weights
from accelerate.hooks import ModelHook, add_hook_to_module
from peft import IA3Config, LoraConfig, PrefixTuningConfig, PromptTuningConfig
from transformers import StoppingCriteria, StoppingCriteriaList

import fastft
from tests.utils import tiny_llama


def _lora(**kw):
    return LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], "init_lora_weights": False, **kw})


# --- adapters beside offloaded layers (fastft/integration/offloaded_weights.py, peft_lora.add_adapter) ---------------

def test_add_adapter_on_new_targets_of_an_offloaded_model_is_refused():
    """peft builds a new LoRA layer beside an offloaded one on meta (an adapter on a layer already adapted stays where
    it was built): add_adapter refuses that as get_peft_model does."""
    model = fastft.get_peft_model(tiny_llama(), _lora())
    cpu_offload(model, execution_device=torch.device("cpu"))
    with pytest.raises(ValueError, match=r"add_adapter: .*v_proj\.lora_A\.second.*on the meta device with no values"):
        fastft.add_adapter(model, "second", _lora(target_modules=["v_proj"]))


def test_load_adapter_on_new_targets_into_an_offloaded_peft_model_is_refused(tmp_path):
    fastft.get_peft_model(tiny_llama(), _lora(target_modules=["v_proj"])).save_pretrained(tmp_path / "v")
    model = fastft.get_peft_model(tiny_llama(), _lora())
    cpu_offload(model, execution_device=torch.device("cpu"))
    with pytest.raises(ValueError, match=r"load_adapter: .*v_proj\.lora_A\.second.*on the meta device with no values"):
        fastft.load_adapter(model, tmp_path / "v", adapter_name="second")


def test_the_refusal_lists_four_parameters_without_a_count_of_more():
    base = tiny_llama()
    cpu_offload(base, execution_device=torch.device("cpu"))
    with pytest.raises(ValueError, match="on the meta device") as refused:
        fastft.get_peft_model(base, _lora(target_modules=["q_proj", "v_proj"], layers_to_transform=[0]))
    message = str(refused.value)
    assert message.count("layers.0.self_attn.") == 4 and "more" not in message


def test_an_offload_hook_inside_a_sequential_hook_still_counts():
    """accelerate puts a layer's hooks in a SequentialHook when another is appended: its offload hook still loads
    the layer's weights, which are not taken for adapters without values."""
    model = fastft.get_peft_model(tiny_llama(), _lora())
    cpu_offload(model, execution_device=torch.device("cpu"))
    up = model.base_model.model.model.layers[0].mlp.up_proj
    add_hook_to_module(up, ModelHook(), append=True)
    assert type(up._hf_hook).__name__ == "SequentialHook" and up.weight.is_meta
    fastft.add_adapter(model, "second", _lora())  # beside q_proj's adapter: on the CPU, with values


def test_meta_parameters_without_offload_hooks_are_the_caller_s_plan():
    """A model built under init_empty_weights (no accelerate hook): its adapters on meta are not refused."""
    with init_empty_weights():
        base = tiny_llama()
    model = fastft.get_peft_model(base, _lora())
    assert any(p.is_meta for n, p in model.named_parameters() if "lora_A" in n)


def _ia3(*targets):
    return IA3Config(target_modules=[*targets, "down_proj"], feedforward_modules=["down_proj"])


def test_add_adapter_of_ia3_on_new_targets_of_an_offloaded_model_is_refused():
    model = fastft.get_peft_model(tiny_llama(), _ia3("k_proj"))
    cpu_offload(model, execution_device=torch.device("cpu"))
    with pytest.raises(ValueError, match=r"add_adapter: .*v_proj\.ia3_l\.second.*on the meta device with no values"):
        fastft.add_adapter(model, "second", _ia3("v_proj"))


def test_add_adapter_with_an_ia3_config_does_not_warn_of_lora_layers():
    """An IA3 adapter added is fused as IA3 (no "no LoRA layer is fused" warning meant for LoRA adapters)."""
    model = fastft.get_peft_model(tiny_llama(), _ia3("k_proj"))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        fastft.add_adapter(model, "second", _ia3("v_proj"))
    assert [str(w.message) for w in seen if "fastft" in str(w.message)] == []


# --- prompt learning's generate wrapper (fastft/integration/methods/generation.py) ----------------------------------

def _prompt_model():
    model = fastft.get_peft_model(tiny_llama(), PromptTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM")).eval()
    with torch.no_grad():  # virtual tokens that change the scores
        for name, p in model.named_parameters():
            if "prompt_encoder" in name:
                p.normal_(0, 1.0)
    model.generation_config.pad_token_id = 0
    model.get_base_model().generation_config.pad_token_id = 0
    return model


class _Hold(StoppingCriteria):
    """Holds its generate call at the first step until released."""

    def __init__(self):
        self.started, self.release = threading.Event(), threading.Event()

    def __call__(self, input_ids, scores, **kwargs):
        self.started.set()
        assert self.release.wait(120)
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)


def test_a_plain_generate_beside_a_prompt_generate_in_flight_gets_no_virtual_tokens():
    """While another thread's prompt-tuning generate is in flight the base model holds the wrapper: this thread's
    plain base.generate (after a prompt generate of its own, finished) must read no adjustment."""
    model = _prompt_model()
    base = model.get_base_model()
    ids = torch.randint(1, 128, (1, 6), generator=torch.Generator().manual_seed(3))
    kwargs = dict(max_new_tokens=4, do_sample=False, output_scores=True, return_dict_in_generate=True)
    with torch.no_grad():
        want = base.generate(input_ids=ids, **kwargs)
        model.generate(input_ids=ids, max_new_tokens=2, do_sample=False)  # this thread's own call, done
    hold, errors = _Hold(), []

    def other():
        try:
            with torch.no_grad():
                model.generate(input_ids=ids, max_new_tokens=2, do_sample=False,
                               stopping_criteria=StoppingCriteriaList([hold]))
        except BaseException as e:  # noqa: BLE001 - re-raised below
            errors.append(e)
            hold.started.set()

    thread = threading.Thread(target=other)
    thread.start()
    try:
        assert hold.started.wait(120)
        assert "prepare_inputs_for_generation" in base.__dict__  # the other call's wrapper is installed
        with torch.no_grad():
            got = base.generate(input_ids=ids, **kwargs)
    finally:
        hold.release.set()
        thread.join()
    assert not errors, errors
    assert torch.equal(got.sequences, want.sequences)
    torch.testing.assert_close(torch.stack(got.scores), torch.stack(want.scores), rtol=0, atol=0)
    assert "prepare_inputs_for_generation" not in base.__dict__


def test_generate_puts_back_the_instance_s_own_prepare_inputs_for_generation():
    """A base model holding its own prepare_inputs_for_generation (an instance attribute) gets it back after a
    prompt generate, which went through it."""
    model = _prompt_model()
    base = model.get_base_model()
    own, calls = base.prepare_inputs_for_generation, []

    def mine(*args, **kwargs):
        calls.append(1)
        return own(*args, **kwargs)

    base.prepare_inputs_for_generation = mine
    with torch.no_grad():
        model.generate(input_ids=torch.tensor([[5, 6, 7]]), max_new_tokens=3, do_sample=False)
    assert base.__dict__["prepare_inputs_for_generation"] is mine
    assert len(calls) == 3


def test_a_generated_model_with_its_own_prepare_inputs_is_freed_after_generate():
    """Nothing fastft keeps after a generate call holds the model (the instance's own prepare_inputs_for_generation,
    kept while calls were in flight, refers to it)."""
    model = _prompt_model()
    base = model.get_base_model()
    own = base.prepare_inputs_for_generation
    base.prepare_inputs_for_generation = lambda *args, _own=own, **kwargs: _own(*args, **kwargs)
    with torch.no_grad():
        model.generate(input_ids=torch.tensor([[5, 6, 7]]), max_new_tokens=2, do_sample=False)
    gone = weakref.ref(base)
    del model, base, own
    gc.collect()
    assert gone() is None


# --- LoraConfig.lora_alpha / alpha_pattern (fastft/integration/lora_config.py) ---------------------------------------

@pytest.mark.parametrize("field, kwargs", [
    ("lora_alpha", {"lora_alpha": True}), ("lora_alpha", {"lora_alpha": math.inf}),
    (r"alpha_pattern\['q_proj'\]", {"alpha_pattern": {"q_proj": math.inf}})])
def test_lora_alpha_true_or_infinite_is_refused(field, kwargs):
    with pytest.raises(ValueError, match=f"LoraConfig.{field}=.*expected a positive finite number"):
        fastft.get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"], **kwargs))


def test_a_float_lora_alpha_is_taken():
    model = fastft.get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=6.0, target_modules=["q_proj"],
                                                           alpha_pattern={"q_proj": 2.0}))
    assert model.base_model.model.model.layers[0].self_attn.q_proj.scaling["default"] == 0.5


# --- PrefixTuningConfig.num_virtual_tokens (fastft/integration/methods/prefix.py) -----------------------------------

@pytest.mark.parametrize("tokens", [2.5, 3.0, "3"])
def test_prefix_tuning_refuses_virtual_tokens_that_are_not_an_int(tokens):
    with pytest.raises(ValueError, match=r"PrefixTuningConfig.num_virtual_tokens=.*expected a positive integer"):
        fastft.get_peft_model(tiny_llama(), PrefixTuningConfig(num_virtual_tokens=tokens, task_type="CAUSAL_LM"))


# --- FSDP2 on one rank (fastft/quant/nf4_fsdp.py) -------------------------------------------------------------------

class _Ranks:  # FSDP2's mesh as the hooks read it
    def __init__(self, world):
        self.world = world

    def size(self):
        return self.world


@pytest.mark.parametrize("double_quant", [True, False])
def test_one_rank_fsdp_rebuilds_the_weight_from_the_first_all_gather_input_alone(double_quant):
    """torch's one-rank FSDP2 (FSDPParamGroup.wait_for_unshard, world_size == 1) copies only the first all-gather
    input: the weight must come back from it, the scales riding in the metadata, and FSDP2 frees only that copy."""
    from fastft.quant import quantize_nf4

    torch.manual_seed(0)
    w = quantize_nf4(torch.randn(8, 64), blocksize=64, double_quant=double_quant)
    inputs, meta = w.fsdp_pre_all_gather(_Ranks(1), w.shape, None, None, None)
    copied = (inputs[0].clone(),)  # what torch gathers on one rank
    full, freed = w.fsdp_post_all_gather(copied, meta, torch.float32)
    assert torch.equal(full.dequantize(), w.dequantize())
    assert len(freed) == 1 and freed[0] is copied[0]
    # later all-gathers: into the same buffers
    assert full.fsdp_post_all_gather(copied, meta, torch.float32, out=full) is None
    assert torch.equal(full.dequantize(), w.dequantize())


@pytest.mark.parametrize("double_quant", [True, False])
def test_uneven_shards_with_a_rank_past_the_last_row_gather_back_the_weight(double_quant):
    """5 rows over 4 ranks: torch.chunk makes 2/2/1 and the fourth rank's shard starts past the last row (5 - 3·2 < 0
    rows of its own): it adds nothing to the gathered weight."""
    from fastft.quant import quantize_nf4
    from tests.test_nf4_uneven_shards import _all_gather

    torch.manual_seed(0)
    w = quantize_nf4(torch.randn(5, 64), blocksize=64, double_quant=double_quant)
    full, _, _, _, _ = _all_gather(w, 4)
    assert full.shape == (5, 64)
    assert torch.equal(full.dequantize(), w.dequantize())


def test_a_shard_longer_than_the_padded_shard_is_refused():
    """3 rows as one rank's shard of a 4-row weight over 3 ranks (at most ceil(4/3) = 2 rows each)."""
    from fastft.quant import quantize_nf4

    torch.manual_seed(0)
    w = quantize_nf4(torch.randn(3, 64), blocksize=64, double_quant=False)
    with pytest.raises(ValueError, match=r"FSDP shard of shape \(3, 64\) is not a dim-0 shard of at most 2 rows"):
        w.fsdp_pre_all_gather(_Ranks(3), (4, 64), None, None, None)


def test_a_later_all_gather_into_buffers_that_are_not_the_weight_s_is_refused():
    """Even shards: a later all-gather writes into the unsharded weight's own buffers; outputs elsewhere (FSDP2
    re-allocated them, the weight not) would leave the weight reading stale bytes."""
    from fastft.quant import quantize_nf4
    from tests.test_nf4_uneven_shards import _all_gather

    torch.manual_seed(0)
    w = quantize_nf4(torch.randn(8, 64), blocksize=64, double_quant=True)
    full, _, outputs, meta, shards = _all_gather(w, 2)
    assert shards[0][0].fsdp_post_all_gather(outputs, meta, torch.float32, out=full) is None  # its own buffers
    with pytest.raises(RuntimeError, match="not the unsharded weight's storage"):
        shards[0][0].fsdp_post_all_gather([o.clone() for o in outputs], meta, torch.float32, out=full)


# --- the names save_nf4_model stores under (fastft/integration/checkpoint_keys.stored_namer) ------------------------

def _inkling2():
    pytest.importorskip("transformers.conversion_mapping")
    from tests.test_nf4_save_keys_transformers_renames import _model

    return _model("inkling2_text")


def test_inkling2_keys_its_renamings_leave_alone_keep_the_model_s_names():
    """Inkling2's reversed renamings (model. → model.llm., ...) change every key; only the keys its load-time
    renamings change are stored under another name."""
    from fastft.integration.checkpoint_keys import stored_namer

    stored = stored_namer(_inkling2())
    for key in ("model.embed_tokens.weight", "model.embed_tokens.weight.absmax", "lm_head.weight",
                "model.layers.0.self_attn.q_proj.weight.absmax"):
        assert stored(key) == key


def test_inkling2_renamed_keys_are_stored_as_transformers_save_pretrained_writes_them(tmp_path):
    from safetensors import safe_open

    from fastft.integration.checkpoint_keys import stored_namer

    model = _inkling2()
    model.save_pretrained(tmp_path / "dense")
    with safe_open(str(tmp_path / "dense" / "model.safetensors"), "pt") as f:
        written = set(f.keys())
    stored = stored_namer(model)
    renamed = {k: stored(k) for k in model.state_dict() if stored(k) != k}
    assert len(renamed) >= 3  # embed_norm, the sconv weight_proj layers
    assert set(renamed.values()) <= written, set(renamed.values()) - written


# --- an NF4 model's save_pretrained (fastft/integration/nf4_model.py) -----------------------------------------------

def test_save_pretrained_takes_a_default_option_spelled_as_an_equal_value(tmp_path):
    """transformers' default max_shard_size='50GB' given as an equal string built at run time (not the same object)
    is a default, not an option save_nf4_model lacks."""
    model = fastft.quantize_model(tiny_llama())
    model.save_pretrained(tmp_path / "nf4", max_shard_size="".join(["50", "GB"]))
    assert (tmp_path / "nf4" / "config.json").is_file()


# --- the refusal of a head trained whole (fastft/integration/lora_config.py) ----------------------------------------

def test_a_head_trained_whole_on_nf4_says_how_to_train_it():
    import transformers

    torch.manual_seed(0)
    model = transformers.BertForQuestionAnswering(transformers.BertConfig(
        vocab_size=96, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64, num_labels=2))
    fastft.quantize_model(model, "nf4", use_default_skip=False)
    with pytest.raises(ValueError, match=r"cannot be trained or saved whole\. To train it, keep it dense when "
                                         r"quantizing: fastft\.quantize_model\(model, skip=\['qa_outputs'\]\)"):
        fastft.get_peft_model(model, LoraConfig(r=4, target_modules=["query", "value"], task_type="QUESTION_ANS"))


# --- the patched RMSNorm (fastft/modules/fused_layers.py) -----------------------------------------------------------

def test_a_patched_rmsnorm_s_weight_gets_the_unpatched_gradient():
    """The weight the forward reads (kept for backward's recompute) is the parameter itself: full fine-tuning
    trains the norms as the unpatched model does."""
    x = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(5))
    grads = {}
    for patched in (False, True):
        model = tiny_llama().train()
        if patched:
            fastft.patch_model(model)
        model(input_ids=x, labels=x).loss.backward()
        grads[patched] = [m.weight.grad for n, m in model.named_modules() if n.endswith("norm")]
    assert len(grads[False]) == 5 and all(g is not None for g in grads[False])
    assert all(g is not None for g in grads[True])
    for ours, want in zip(grads[True], grads[False]):
        torch.testing.assert_close(ours, want, rtol=1e-5, atol=1e-7)
