"""Several adapters on a fastft model, dense or NF4 (QLoRA), against plain peft on the same (dequantized) weights:
peft's own model.add_adapter/model.load_adapter routed through fastft's, merging a subset of adapters
(merge_and_unload(adapter_names=...)), and the rounding warnings of a merge into NF4 weights."""
import copy
import pickle
import shutil
import warnings

import peft
import pytest
import torch
from peft import LoraConfig

import fastft
from fastft.modules.lora import FusedLoraBase
from fastft.modules.nf4_linear import NF4Linear
from fastft.modules.qlora import FusedQLoraLinear, NF4RoundingWarning
from tests.utils import ALL_LINEAR, tiny_llama

IDS = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(5))
FIRST = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
SECOND = LoraConfig(r=4, lora_alpha=8, target_modules=["gate_proj", "q_proj"])  # gate_proj: a layer FIRST lacks
EXACT = "fastft.merge_and_unload(model) merges into dense weights exactly"


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits


def _randomize(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) * 0.1)


def _sync(ref, ours):
    """ours's adapter tensors := ref's (same names on both)."""
    ours.load_state_dict({k: v for k, v in ref.state_dict().items() if "lora_" in k}, strict=False)


def _pair(kind: str, config=FIRST):
    """(fastft model on a dense or NF4 base, peft on the same dense / dequantized weights), adapters equal."""
    base = tiny_llama()
    if kind == "nf4":
        base = fastft.quantize_model(base, "nf4")
    dense = copy.deepcopy(base)
    for name, module in list(dense.named_modules()):
        if isinstance(module, NF4Linear):
            parent, _, child = name.rpartition(".")
            setattr(dense.get_submodule(parent), child, module.to_linear(torch.float32))
    ref = peft.get_peft_model(dense, copy.deepcopy(config))
    ours = fastft.get_peft_model(base, copy.deepcopy(config))
    _randomize(ref, 1)
    _sync(ref, ours)
    return ours, ref


def _adapted_layers(model, name):
    return [m for m in model.modules() if isinstance(m, peft.tuners.lora.LoraLayer) and name in m.lora_A]


def _fused(kind):
    return FusedQLoraLinear if kind == "nf4" else FusedLoraBase


# --- peft's own add_adapter / load_adapter on a fastft model (finding 3) --------------------------------------------

@pytest.mark.parametrize("kind", ["dense", "nf4"])
def test_peft_add_adapter_is_routed_through_fastft(kind, tmp_path):
    ours, ref = _pair(kind)
    assert ours.add_adapter("b", copy.deepcopy(SECOND)) is None  # peft's spelling and return value
    ref.add_adapter("b", copy.deepcopy(SECOND))
    _randomize(ref, 2)
    _sync(ref, ours)
    layers = _adapted_layers(ours, "b")
    assert len(layers) == 4 and all(isinstance(m, _fused(kind)) for m in layers)
    for active in ("b", ["default", "b"]):
        ours.base_model.set_adapter(active), ref.base_model.set_adapter(active)
        assert torch.allclose(_logits(ours), _logits(ref), atol=1e-5), active
    fastft.save_adapter(ours, tmp_path)  # each adapter's file holds its own tensors only
    default_keys = set(peft.utils.load_peft_weights(str(tmp_path), device="cpu"))
    assert len(default_keys) == 8 and not any(".b." in k for k in default_keys)
    assert len(peft.utils.load_peft_weights(str(tmp_path / "b"), device="cpu")) == 8


@pytest.mark.parametrize("kind", ["dense", "nf4"])
def test_peft_load_adapter_is_routed_through_fastft(kind, tmp_path):
    ours, ref = _pair(kind)
    ref.add_adapter("b", copy.deepcopy(SECOND))
    _randomize(ref, 2)
    ref.save_pretrained(str(tmp_path), selected_adapters=["b"])
    _, plain = _pair(kind)
    want = plain.load_adapter(str(tmp_path), "b", subfolder="b", is_trainable=True)
    result = ours.load_adapter(str(tmp_path), "b", subfolder="b", is_trainable=True)  # peft's arguments
    assert result == want  # peft's load result (its missing/unexpected keys)
    layers = _adapted_layers(ours, "b")
    assert len(layers) == 4 and all(isinstance(m, _fused(kind)) for m in layers)
    assert all(m.lora_A["b"].weight.requires_grad for m in layers)
    ours.set_adapter("b"), ref.set_adapter("b")
    assert torch.allclose(_logits(ours), _logits(ref), atol=1e-5)


def test_peft_add_adapter_of_an_ia3_model_is_routed_too():
    from fastft.integration.methods.ia3 import FusedIA3Linear

    config = peft.IA3Config(target_modules=["v_proj", "down_proj"], feedforward_modules=["down_proj"])
    ours = fastft.get_peft_model(tiny_llama(), copy.deepcopy(config))
    ref = peft.get_peft_model(tiny_llama(), copy.deepcopy(config))
    ours.add_adapter("b", copy.deepcopy(config)), ref.add_adapter("b", copy.deepcopy(config))
    with torch.no_grad():
        for model in (ours, ref):
            for name, p in model.named_parameters():
                if ".b." in name:
                    p.copy_(torch.linspace(0.5, 1.5, p.numel()).reshape(p.shape))
    layers = [m for m in ours.modules() if isinstance(m, peft.tuners.ia3.IA3Layer) and "b" in m.ia3_l]
    assert len(layers) == 4 and all(isinstance(m, FusedIA3Linear) for m in layers)
    ours.set_adapter("b"), ref.set_adapter("b")
    assert torch.allclose(_logits(ours), _logits(ref), atol=1e-5)


def test_peft_load_adapter_passes_peft_options_through(tmp_path):
    """autocast_adapter_dtype=False keeps a bf16 base's adapters in bf16 (peft's option), as plain peft does."""
    ours = fastft.get_peft_model(tiny_llama().to(torch.bfloat16), copy.deepcopy(FIRST))
    ref = peft.get_peft_model(tiny_llama().to(torch.bfloat16), copy.deepcopy(FIRST))
    ref.add_adapter("b", copy.deepcopy(SECOND), autocast_adapter_dtype=False)
    ref.save_pretrained(str(tmp_path), selected_adapters=["b"])
    ours.load_adapter(str(tmp_path / "b"), "b", autocast_adapter_dtype=False)
    ours.add_adapter("c", copy.deepcopy(SECOND), False, False)  # low_cpu_mem_usage, autocast_adapter_dtype
    for name in ("b", "c"):
        assert {m.lora_A[name].weight.dtype for m in _adapted_layers(ours, name)} == {torch.bfloat16}, name
    assert {m.lora_A["b"].weight.dtype for m in _adapted_layers(ref, "b")} == {torch.bfloat16}


def test_peft_load_adapter_from_the_hub_downloads_as_peft(tmp_path, monkeypatch):
    """A Hub id: adapter_config.json and the weights fetched with hf_hub_download (its options passed), then loaded
    as a folder. The Hub is simulated by a folder (no network in tests)."""
    import huggingface_hub

    ours, ref = _pair("nf4")
    ref.add_adapter("b", copy.deepcopy(SECOND))
    _randomize(ref, 2)
    ref.save_pretrained(str(tmp_path / "repo"), selected_adapters=["b"])
    calls = []

    def fake_download(repo_id, filename, subfolder=None, revision=None, **kwargs):
        calls.append((repo_id, filename, subfolder, revision))
        source = tmp_path / "repo" / subfolder / filename
        if not source.exists():
            raise huggingface_hub.errors.EntryNotFoundError(filename)
        target = tmp_path / "cache" / subfolder / filename
        target.parent.mkdir(parents=True, exist_ok=True)
        return str(shutil.copy(source, target))

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    ours.load_adapter("someone/adapters", "b", subfolder="b", revision="v1")
    assert calls == [("someone/adapters", "adapter_config.json", "b", "v1"),
                     ("someone/adapters", "adapter_model.safetensors", "b", "v1")]
    assert all(isinstance(m, FusedQLoraLinear) for m in _adapted_layers(ours, "b"))
    ours.set_adapter("b"), ref.set_adapter("b")
    assert torch.allclose(_logits(ours), _logits(ref), atol=1e-5)


@pytest.mark.parametrize("kind", ["dense", "nf4"])
def test_routed_model_deepcopies_and_pickles(kind):
    ours, _ = _pair(kind)
    want = _logits(ours)
    for copied in (copy.deepcopy(ours), pickle.loads(pickle.dumps(ours))):
        assert type(copied).__name__ == type(ours).__name__ == "PeftModel"  # peft's class name kept
        assert torch.equal(_logits(copied), want)
        copied.add_adapter("b", copy.deepcopy(SECOND))  # still routed: the new layers fused
        assert all(isinstance(m, _fused(kind)) for m in _adapted_layers(copied, "b"))
    assert "b" not in ours.peft_config  # the copies are independent


def test_other_adapter_kinds_keep_peft_add_adapter():
    """fastft adds LoRA and IA3 adapters; peft's own add_adapter keeps its rules for others (here its refusal)."""
    ours, _ = _pair("dense")
    with pytest.raises(ValueError, match="Cannot combine adapters with different peft types"):
        ours.add_adapter("soft", peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))


def test_failed_add_leaves_no_half_built_adapter(tmp_path):
    """peft fails partway on a target type it does not support (a norm layer, after layer 0's q_proj got the
    adapter): the layers built so far are removed, so nothing of "b" is saved with the default adapter."""
    ours, _ = _pair("nf4")
    keys = set(ours.state_dict())
    for add in (lambda c: ours.add_adapter("b", c), lambda c: fastft.add_adapter(ours, "b", c)):
        with pytest.raises(ValueError, match="is not supported"):
            add(LoraConfig(r=4, target_modules=["q_proj", "input_layernorm"]))
        assert set(ours.state_dict()) == keys and "b" not in ours.peft_config
    fastft.save_adapter(ours, tmp_path)
    assert len(peft.utils.load_peft_weights(str(tmp_path), device="cpu")) == 8


# --- merging into NF4 weights: warned (finding 2) ---------------------------------------------------------------

def _nf4_warnings(record):
    return [str(w.message) for w in record if issubclass(w.category, NF4RoundingWarning)]


def test_merging_into_nf4_warns_once_per_call_with_the_exact_alternative():
    ours, _ = _pair("nf4", LoraConfig(r=8, lora_alpha=16, target_modules=ALL_LINEAR))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("default")  # Python's default: once per place the warning comes from, not per layer
        ours.merge_adapter()
        merged_warnings = _nf4_warnings(record)
        with ours.disable_adapter():  # peft's forward unmerges a merged layer here: a second re-quantization
            _logits(ours)
    unmerge_warnings = _nf4_warnings(record)[len(merged_warnings):]
    assert len(merged_warnings) == 1 and merged_warnings[0].startswith("Merge lora module to 4-bit linear")
    assert len(unmerge_warnings) == 1 and unmerge_warnings[0].startswith("Unmerge lora module to 4-bit linear")
    assert EXACT in merged_warnings[0] and EXACT in unmerge_warnings[0]
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        copy.deepcopy(ours).merge_and_unload()  # peft's own merge_and_unload merges into NF4 too
        assert len(_nf4_warnings(record)) == 2 * len(ALL_LINEAR)  # always: once per layer
        fastft.merge_and_unload(copy.deepcopy(ours))  # dense, exact: nothing to warn
        fastft.merge_and_unload(copy.deepcopy(ours), requantize=True)  # asked for NF4: documented, not warned
    assert len(_nf4_warnings(record)) == 2 * len(ALL_LINEAR)


# --- fastft.merge_and_unload after a merge into NF4 (finding 1) ---------------------------------------------------

def test_merge_and_unload_after_merge_adapter_warns_that_the_result_carries_the_nf4_rounding():
    ours, ref = _pair("nf4", LoraConfig(r=8, lora_alpha=16, target_modules=ALL_LINEAR))
    exact = _logits(ref.merge_and_unload())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NF4RoundingWarning)
        ours.merge_adapter()
    merged_into_nf4 = _logits(ours)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        merged = fastft.merge_and_unload(ours)
    messages = [str(w.message) for w in record]
    assert len(_nf4_warnings(record)) == 1
    assert "14 QLoRA layers hold adapter(s) ['default'] merged" in _nf4_warnings(record)[0]
    assert not any("already merged" in m for m in messages)  # peft's per-layer "nothing to do" left out
    assert torch.allclose(_logits(merged), merged_into_nf4, atol=1e-5)  # the dense copy of that merge
    assert (_logits(merged) - exact).abs().max() > 1e-2  # which is not W + ΔW (what the warning says)


# --- fastft.merge_and_unload(adapter_names=...) (finding 4) -------------------------------------------------------

@pytest.mark.parametrize("kind", ["dense", "nf4"])
@pytest.mark.parametrize("names", [["b"], ["default", "b"]])
def test_merge_and_unload_adapter_names_matches_peft(kind, names):
    ours, ref = _pair(kind, LoraConfig(r=8, lora_alpha=16, target_modules=ALL_LINEAR))
    ref.add_adapter("b", copy.deepcopy(SECOND))
    fastft.add_adapter(ours, "b", copy.deepcopy(SECOND))
    _randomize(ref, 2)
    _sync(ref, ours)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        merged = fastft.merge_and_unload(ours, adapter_names=names, progressbar=True)
    assert not _nf4_warnings(record)  # dense merge: exact
    want = ref.merge_and_unload(adapter_names=names)
    assert not any(isinstance(m, NF4Linear) for m in merged.modules())
    for (name, w), (name_ref, w_ref) in zip(merged.state_dict().items(), want.state_dict().items()):
        assert name == name_ref and torch.allclose(w, w_ref, atol=1e-6), name
    assert torch.allclose(_logits(merged), _logits(want), atol=1e-5)


def test_merge_and_unload_refuses_adapter_names_peft_would_ignore():
    ours, _ = _pair("nf4")
    with pytest.raises(ValueError, match="adapter_names entry 'typo' is not an adapter of this model; its adapters "
                                         r"are \['default'\]"):
        fastft.merge_and_unload(ours, adapter_names=["typo"])
    with pytest.raises(TypeError, match=r"expected a list of adapter names, e.g. \['default'\]"):
        fastft.merge_and_unload(ours, adapter_names="default")
    assert any(isinstance(m, FusedQLoraLinear) for m in ours.modules())  # refused before anything changed
