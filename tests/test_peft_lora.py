"""The thin PEFT layer on a tiny random Llama: same outputs as peft, peft's format both ways, adapter
management, merging and clear errors."""
import copy

import peft
import pytest
import torch
from peft import LoraConfig, PeftModel
from torch import nn

import fastft
from fastft.modules.lora import FusedLoraLinear
from tests.utils import ALL_LINEAR, interpreter_only, randomize_lora_B, tiny_llama

IDS = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(5))


def _pair(config: LoraConfig, base=None):
    """(peft model, fastft model) with identical weights and adapters."""
    base = base or tiny_llama()
    ref = peft.get_peft_model(copy.deepcopy(base), copy.deepcopy(config))
    randomize_lora_B(ref)
    ours = fastft.get_peft_model(copy.deepcopy(base), copy.deepcopy(config))
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits


def _fused_layers(model):
    return [m for m in model.modules() if isinstance(m, FusedLoraLinear)]


@pytest.fixture
def triton_backend(monkeypatch):
    monkeypatch.setenv("FASTFT_LORA_BACKEND", "triton")


def test_layers_are_fused_and_only_adapters_train():
    config = LoraConfig(r=4, lora_alpha=8, target_modules=ALL_LINEAR, modules_to_save=["lm_head"])
    model = fastft.get_peft_model(tiny_llama(), config)
    assert len(_fused_layers(model)) == 2 * len(ALL_LINEAR)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or "modules_to_save" in n for n in trainable)
    assert any("modules_to_save" in n for n in trainable)


CONFIGS = {
    "plain": LoraConfig(r=8, lora_alpha=16, target_modules=ALL_LINEAR),
    "rslora": LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], use_rslora=True),
    "patterns": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"],
                           rank_pattern={"down_proj": 12}, alpha_pattern={"q_proj": 3}),
    "layers": LoraConfig(r=4, lora_alpha=8, target_modules=["o_proj", "up_proj"], layers_to_transform=[1]),
    "gaussian_bias_all": LoraConfig(r=4, lora_alpha=4, target_modules=["gate_proj"], init_lora_weights="gaussian",
                                    bias="all"),
}


@interpreter_only
@pytest.mark.parametrize("name", CONFIGS)
def test_triton_path_matches_peft(name, triton_backend):
    ref, ours = _pair(CONFIGS[name])
    ref.train(), ours.train()
    loss_ref = ref(IDS, labels=IDS).loss
    loss_ours = ours(IDS, labels=IDS).loss
    loss_ref.backward()
    loss_ours.backward()
    assert torch.allclose(loss_ours, loss_ref, rtol=1e-5, atol=1e-6)
    grads_ref = {n: p.grad for n, p in ref.named_parameters() if p.requires_grad}
    grads = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    assert grads.keys() == grads_ref.keys()
    for n in grads:
        assert torch.allclose(grads[n], grads_ref[n], rtol=1e-4, atol=1e-6), n


def test_save_with_fastft_load_with_peft(tmp_path):
    ref, ours = _pair(CONFIGS["patterns"])
    fastft.save_adapter(ours, tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "adapter"))
    assert torch.allclose(_logits(loaded), _logits(ours), atol=1e-6)
    assert not torch.allclose(_logits(loaded), _logits(tiny_llama()), atol=1e-4)  # the adapter mattered


def test_save_with_peft_load_with_fastft(tmp_path):
    ref, _ = _pair(CONFIGS["plain"])
    ref.save_pretrained(str(tmp_path / "adapter"))
    loaded = fastft.load_adapter(tiny_llama(), tmp_path / "adapter")
    assert _fused_layers(loaded)
    assert torch.allclose(_logits(loaded), _logits(ref), atol=1e-6)


def test_save_adapter_replaces_atomically(tmp_path):
    _, ours = _pair(CONFIGS["plain"])
    target = tmp_path / "adapter"
    fastft.save_adapter(ours, target)
    first = (target / "adapter_model.safetensors").read_bytes()
    randomize_lora_B(ours, seed=9)
    fastft.save_adapter(ours, target)
    assert (target / "adapter_model.safetensors").read_bytes() != first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no temporary leftovers


def test_patch_peft_in_place_keeps_state_and_outputs():
    ref, _ = _pair(CONFIGS["plain"])
    expected = _logits(ref)
    state = {k: v.clone() for k, v in ref.state_dict().items()}
    patched = fastft.patch_peft(ref)
    assert patched is ref and len(_fused_layers(ref)) == 2 * len(ALL_LINEAR)
    assert ref.state_dict().keys() == state.keys()
    assert all(torch.equal(ref.state_dict()[k], v) for k, v in state.items())
    assert torch.allclose(_logits(ref), expected, atol=1e-6)


def test_named_adapters_switch_disable_delete():
    ref, ours = _pair(CONFIGS["plain"])
    second = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])
    ref.add_adapter("second", copy.deepcopy(second))
    fastft.add_adapter(ours, "second", copy.deepcopy(second))
    randomize_lora_B(ref, seed=3)
    ours.load_state_dict(ref.state_dict())
    base_logits = _logits(tiny_llama())

    for adapter in ("second", "default"):
        ref.set_adapter(adapter)
        ours.set_adapter(adapter)
        assert torch.allclose(_logits(ours), _logits(ref), atol=1e-6), adapter
    with ours.disable_adapter():
        assert torch.allclose(_logits(ours), base_logits, atol=1e-6)
    # two adapters active at once: one fused op over the stacked ranks
    ref.base_model.set_adapter(["default", "second"])
    ours.base_model.set_adapter(["default", "second"])
    assert torch.allclose(_logits(ours), _logits(ref), atol=1e-6)
    ours.set_adapter("default")
    ours.delete_adapter("second")
    assert "second" not in ours.peft_config
    ref.set_adapter("default")
    assert torch.allclose(_logits(ours), _logits(ref), atol=1e-6)


def _two_active(config, second_dtype=torch.float32):
    """(peft model, fastft model) with adapters "default" and "second" both active, identical weights; fastft's
    second adapter in `second_dtype` (peft's holds the same values in fp32)."""
    ref, ours = _pair(config)
    ref.add_adapter("second", copy.deepcopy(config))
    fastft.add_adapter(ours, "second", copy.deepcopy(config))
    randomize_lora_B(ref, seed=3)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if ".second." in name:
                p.copy_(p.to(second_dtype))
    ours.load_state_dict(ref.state_dict())
    for name, module in ours.named_modules():
        if name.endswith(".second") and isinstance(module, nn.Linear):
            module.to(second_dtype)
    for model in (ref, ours):
        model.base_model.set_adapter(["second", "default"])
    return ref, ours


def test_several_active_adapters_with_dropout_draw_a_mask_each_as_peft_does():
    ref, ours = _two_active(LoraConfig(r=4, lora_alpha=8, lora_dropout=0.5, target_modules=["q_proj", "v_proj"]))
    ref.train(), ours.train()
    torch.manual_seed(1)
    expected = ref(IDS).logits
    torch.manual_seed(1)
    assert torch.allclose(ours(IDS).logits, expected, atol=1e-6)


def test_stacked_adapters_keep_the_widest_dtype():
    """A bf16 adapter listed before an fp32 one: the fp32 adapter's weights and gradients are not rounded to bf16."""
    ref, ours = _two_active(CONFIGS["plain"], second_dtype=torch.bfloat16)
    ref(IDS, labels=IDS).loss.backward()
    ours(IDS, labels=IDS).loss.backward()
    grads = {n: p.grad for n, p in ref.named_parameters() if p.requires_grad and ".default." in n}
    assert grads
    for name, p in ours.named_parameters():
        if name in grads:
            assert torch.allclose(p.grad, grads[name], rtol=1e-4, atol=1e-7), name


def test_merge_unmerge_and_unload():
    _, ours = _pair(CONFIGS["plain"])
    expected = _logits(ours)
    weights = {n: p.clone() for n, p in ours.named_parameters() if "base_layer.weight" in n}
    ours.merge_adapter()
    assert torch.allclose(_logits(ours), expected, atol=1e-5)
    ours.unmerge_adapter()
    for n, p in ours.named_parameters():
        if n in weights:
            assert torch.allclose(p, weights[n], atol=1e-6), n
    assert torch.allclose(_logits(ours), expected, atol=1e-6)
    merged = ours.merge_and_unload()
    assert not _fused_layers(merged)
    assert all(type(m) is nn.Linear for n, m in merged.named_modules() if n.endswith("q_proj"))
    assert torch.allclose(_logits(merged), expected, atol=1e-5)


# ---------------------------------------------------------------------------------- errors

@pytest.mark.parametrize("config,message", [
    (LoraConfig(target_modules=["qproj"]), r"target_modules=\['qproj'\] matches no module.*q_proj"),
    (LoraConfig(target_modules=["q_proj"], use_dora=True, fan_in_fan_out=True),
     r"LoraConfig.fan_in_fan_out=True with use_dora=True is not supported"),
    (LoraConfig(target_modules=["q_proj"], init_lora_weights="eva"), r"LoraConfig.init_lora_weights=.eva."),
    (LoraConfig(target_modules=["q_proj"], rank_pattern={"v_proj": 4}), r"rank_pattern key 'v_proj' matches none"),
    (LoraConfig(target_modules=["q_proj"], lora_bias=True), r"LoraConfig.lora_bias=True is not supported"),
])
def test_bad_configs_name_the_field(config, message):
    with pytest.raises(ValueError, match=message):
        fastft.get_peft_model(tiny_llama(), config)


def test_a_peft_config_fastft_lacks_is_named():
    with pytest.raises(TypeError, match="LoHaConfig is not supported by fastft; supported configs: LoraConfig"):
        fastft.get_peft_model(tiny_llama(), peft.LoHaConfig(target_modules=["q_proj"]))


@pytest.mark.parametrize("method", ["ia3", "adapter"])
def test_a_model_with_adapters_is_not_wrapped_again(method):
    """peft only warns and nests the second PeftModel: its save would hold the first method's tensors under the
    second one's config."""
    with_adapters = fastft.get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj"], use_dora=True))
    with pytest.raises(TypeError, match="apply_method: model is already a PeftModel holding adapters"):
        fastft.apply_method(with_adapters, method)
    with pytest.raises(TypeError, match="get_peft_model: model is already a BottleneckAdapterModel"):
        fastft.get_peft_model(fastft.apply_method(tiny_llama(), "adapter"), LoraConfig(target_modules=["q_proj"]))


def test_adapter_for_another_model_is_refused(tmp_path):
    other = peft.get_peft_model(tiny_llama(hidden_size=32, intermediate_size=48),
                                LoraConfig(r=4, target_modules=["q_proj"]))
    other.save_pretrained(str(tmp_path / "other"))
    with pytest.raises(ValueError, match=r"lora_A.weight' in .* has shape \(4, 32\).*needs \(r, 64\)"):
        fastft.load_adapter(tiny_llama(), tmp_path / "other")


def test_adapter_with_unknown_module_is_refused(tmp_path):
    deeper = peft.get_peft_model(tiny_llama(num_hidden_layers=3), LoraConfig(r=4, target_modules=["q_proj"]))
    deeper.save_pretrained(str(tmp_path / "deeper"))
    with pytest.raises(ValueError, match=r"has no module 'model.layers.2.self_attn.q_proj'"):
        fastft.load_adapter(tiny_llama(), tmp_path / "deeper")


def test_missing_adapter_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="adapter_config.json not found"):
        fastft.load_adapter(tiny_llama(), tmp_path)


def test_patch_peft_needs_lora_layers():
    with pytest.raises(ValueError, match="contains no peft LoRA Linear"):
        fastft.patch_peft(tiny_llama())


def test_bad_backend_variable(monkeypatch):
    monkeypatch.setenv("FASTFT_LORA_BACKEND", "cuda")
    model = fastft.get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="FASTFT_LORA_BACKEND must be one of"):
        model(IDS)


@pytest.mark.parametrize("targets", [["lm_head", "q_proj"], ["embed_tokens", "v_proj"]])
@pytest.mark.parametrize("merge", ["fastft", "peft's method", "merge_adapter"])
def test_merging_into_tied_embeddings_keeps_the_outputs(targets, merge, tmp_path):
    """With tied embeddings, peft merged lm_head's ΔW into the weight the embeddings share (logits ~100% off); the
    adapted layer now gets its own copy first, and the merged model saves and loads untied."""
    from transformers import AutoModelForCausalLM

    ours = fastft.get_peft_model(tiny_llama(tie_word_embeddings=True), LoraConfig(r=4, target_modules=targets))
    randomize_lora_B(ours)
    for module in ours.modules():  # embeddings' LoRA: B is lora_embedding_B
        if hasattr(module, "lora_embedding_B") and "default" in module.lora_embedding_B:
            nn.init.normal_(module.lora_embedding_B["default"], std=0.1)
    expected = _logits(ours)
    with pytest.warns(UserWarning, match="shared its weight with another module"):
        if merge == "merge_adapter":
            ours.merge_adapter()
            merged = ours
        else:
            merged = fastft.merge_and_unload(ours) if merge == "fastft" else ours.merge_and_unload()
    assert torch.allclose(_logits(merged), expected, atol=1e-5)
    if merge != "merge_adapter":
        merged.save_pretrained(tmp_path)
        assert torch.allclose(_logits(AutoModelForCausalLM.from_pretrained(tmp_path).eval()), expected, atol=1e-5)


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_tensor_scalings_run_as_peft(use_dora, tmp_path):
    """peft's prepare_model_for_compiled_hotswap (its recipe for swapping adapters under torch.compile) and
    scale_layer(tensor) store a layer's scaling as a 0-dim tensor: the fused op refused it ("`scaling` must be a
    finite number"); the layer runs peft's forward, which keeps it a tensor, and gives peft's logits."""
    from peft.utils.hotswap import hotswap_adapter, prepare_model_for_compiled_hotswap

    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_dora=use_dora)
    ref, ours = _pair(config)
    for model in (ref, ours):
        for layer in model.modules():
            if isinstance(layer, peft.tuners.lora.LoraLayer):
                layer.scale_layer(torch.tensor(2.0))
    torch.testing.assert_close(_logits(ours), _logits(ref), rtol=1e-5, atol=1e-5)
    if use_dora:
        return
    other = peft.get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    randomize_lora_B(other, seed=11)
    other.save_pretrained(tmp_path / "second")
    ref, ours = _pair(config)
    for model in (ref, ours):
        prepare_model_for_compiled_hotswap(model, target_rank=8)
        hotswap_adapter(model, str(tmp_path / "second"), adapter_name="default")
    torch.testing.assert_close(_logits(ours), _logits(ref), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("where", ["lora_B", "lora_dropout", "global"])
def test_hooks_on_adapter_modules_run_as_in_peft(use_dora, where):
    """peft calls lora_B(lora_A(dropout(x))) as modules, so hooks on them run (instrumentation, a user's edit of the
    adapter branch); the fused op read their weights and skipped them (logits 0.23 off). A hooked adapter runs
    peft's forward."""
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_dora=use_dora)
    ref, ours = _pair(config)
    calls = {"ref": 0, "ours": 0}
    handles = []
    for tag, model in (("ref", ref), ("ours", ours)):
        def halve(module, args, out, tag=tag):
            if where != "global" or isinstance(module, nn.Linear) and module.out_features == 4:
                calls[tag] += 1
                return out * 0.5
            return None

        def zero_input(module, args, tag=tag):
            calls[tag] += 1
            return (torch.zeros_like(args[0]),)

        for layer in model.modules():
            if isinstance(layer, peft.tuners.lora.LoraLayer) and where != "global":
                sub = layer.lora_B["default"] if where == "lora_B" else layer.lora_dropout["default"]
                handles.append(sub.register_forward_hook(halve) if where == "lora_B"
                               else sub.register_forward_pre_hook(zero_input))
        if where == "global":  # halves the output of every rank-4 linear (lora_A) the model calls
            handles.append(nn.modules.module.register_module_forward_hook(halve))
        try:
            logits = _logits(model)
        finally:
            for h in handles:
                h.remove()
            handles.clear()
        if tag == "ref":
            want = logits
        else:
            got = logits
    # (peft's DoRA forward skips an nn.Identity dropout: no call, as in the fused forward)
    assert calls["ours"] == calls["ref"] and (calls["ref"] > 0 or use_dora and where == "lora_dropout")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scope", ["module", "global"])
def test_backward_hooks_on_adapter_modules_run_as_in_peft(scope):
    """nn.Module's call runs backward hooks: one on lora_A (or a global one) was skipped by the fused op (gradients
    1e-2 off peft's)."""
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    ref, ours = _pair(config)
    grads, handles = [], []
    triple = lambda mod, gin, gout: tuple(None if g is None else g * 3.0 for g in gin)  # noqa: E731
    for model in (ref, ours):
        if scope == "global":
            handles.append(nn.modules.module.register_module_full_backward_hook(triple))
        else:
            for layer in model.modules():
                if isinstance(layer, peft.tuners.lora.LoraLayer):
                    handles.append(layer.lora_A["default"].register_full_backward_hook(triple))
        try:
            model(IDS).logits.square().mean().backward()
        finally:
            for h in handles:
                h.remove()
            handles.clear()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-5, atol=1e-7, msg=name)


def test_a_forward_left_by_a_removed_accelerate_hook_keeps_the_fused_path():
    """accelerate's remove_hook_from_module leaves the class's own forward bound on the instance: no hook, yet it
    counted as "a forward replaced on the instance", and fusion stayed off for good (with a misleading warning)."""
    from accelerate.hooks import ModelHook, add_hook_to_module, remove_hook_from_module

    from fastft.ops.shared import forward_interceptor

    layer = nn.Linear(4, 4)
    add_hook_to_module(layer, ModelHook())
    assert forward_interceptor(layer) is not None
    remove_hook_from_module(layer)
    assert "forward" in layer.__dict__ and forward_interceptor(layer) is None
    layer.forward = lambda x: x  # a forward of the user's own is still one
    assert forward_interceptor(layer) is not None
    ref, ours = _pair(LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    for layer in _fused_layers(ours):
        for sub in (layer.lora_A["default"], layer.lora_B["default"]):
            add_hook_to_module(sub, ModelHook())
            remove_hook_from_module(sub)
    calls = []
    import fastft.modules.lora as lora_module

    fused = lora_module.FusedLoraLinear._fused
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(lora_module.FusedLoraLinear, "_fused", lambda self, *a: calls.append(1) or fused(self, *a))
        torch.testing.assert_close(_logits(ours), _logits(ref), rtol=1e-5, atol=1e-5)
    assert len(calls) == 2
