"""fastft.patch_model / unpatch_model on tiny random models of the six supported architectures (and the real
SmolLM2): patched vs unpatched logits, loss and every trainable gradient with LoRA on all linear layers and
lm_head, in either order with fastft.get_peft_model; unpatch restores bit-identical outputs; training and
gradient accumulation (num_items_in_batch) match; unsupported models get clear errors and stay untouched.

The model-level tests run the layer ops with backend "auto" (torch on CPU); the Triton kernels are covered at
the op level (tests/test_layer_ops.py) and wired end to end once here with backend="triton" (interpreter).
"""
import copy
import importlib

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig

import fastft
from tests.utils import ALL_LINEAR, TOL, first_layers, interpreter_only, randomize_lora_B, rel_err

ARCHS = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text"]
S = 12


def tiny(arch: str, seed: int = 0, **overrides):
    """hidden 64, 2 layers, vocab 128, head_dim 16 (4 q heads, 2 kv heads); norms randomised so Gemma's 1 + w
    and Llama's w differ from the identity."""
    import transformers as tf

    common = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, max_position_embeddings=64)
    extra = {
        "llama": (tf.LlamaConfig, tf.LlamaForCausalLM, {}),
        "mistral": (tf.MistralConfig, tf.MistralForCausalLM, dict(sliding_window=8)),
        "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM, {}),
        "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM, {}),
        "gemma2": (tf.Gemma2Config, tf.Gemma2ForCausalLM, dict(query_pre_attn_scalar=16, sliding_window=8)),
        "gemma3_text": (tf.Gemma3TextConfig, tf.Gemma3ForCausalLM,
                        dict(query_pre_attn_scalar=16, sliding_window=8, final_logit_softcapping=20.0,
                             layer_types=["sliding_attention", "full_attention"])),
    }[arch]
    config_cls, model_cls, kw = extra
    torch.manual_seed(seed)
    # training mode: the patched forward fuses the loss only there (no dropout in these configs: eval's outputs)
    model = model_cls(config_cls(**{**common, **kw, **overrides})).train()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.2)
    return model


LORA = dict(r=4, lora_alpha=8, target_modules=ALL_LINEAR + ["lm_head"])


def _peft(model, seed=3):
    torch.manual_seed(seed)
    peft_model = fastft.get_peft_model(model, LoraConfig(**LORA))
    randomize_lora_B(peft_model)
    return peft_model


def _batch(seed=5, batch=2, seq=S):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 128, (batch, seq), generator=g)
    labels = ids.clone()
    labels[0, :3] = -100  # a prompt that does not count
    return ids, labels


def _run(model, ids, labels):
    """(logits without labels, loss with labels, {name: grad} of every trainable parameter, logits with labels).
    Unpatched, the forward with labels also gives the logits; patched it gives none, so they take a no-grad pass."""
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=labels)
    logits = out.logits.detach() if out.logits is not None else None
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g is not None for g in grads.values())
    if logits is None:
        with torch.no_grad():
            logits = model(input_ids=ids).logits
    return logits, out.loss.detach(), grads, out.logits


def _assert_matches(got, want, grad_tol=1e-4):
    logits, loss, grads, logits_with_labels = got
    assert logits_with_labels is None  # the fused loss made no logits tensor
    assert rel_err(logits, want[0]) <= TOL[torch.float32]
    assert abs(loss.item() - want[1].item()) <= 1e-5 * abs(want[1].item())
    assert grads.keys() == want[2].keys()
    lm_head_lora = [n for n in grads if "lm_head" in n and "lora_" in n]
    assert len(lm_head_lora) == 2  # the lm_head adapter trains through the fused loss
    for name, g in grads.items():
        assert rel_err(g, want[2][name]) <= grad_tol, name


@pytest.mark.parametrize("arch", ARCHS)
def test_patch_after_get_peft_model_matches_and_unpatch_restores(arch):
    model = _peft(tiny(arch))
    ids, labels = _batch()
    want = _run(model, ids, labels)
    kept = model.get_base_model().config._attn_implementation  # transformers' default for the model (version-dependent)
    fastft.patch_model(model)
    summary = model.get_base_model()._fastft_patch.summary
    per_layer = 2 + 2 * (arch.startswith("gemma")) + 2 * (arch in ("qwen3", "gemma3_text"))  # sandwich, q/k norms
    assert summary["rms_norm"] == 2 * per_layer + 1
    assert summary["glu_mlp"] == 2 and summary["rope_attention"] == 2 and summary["fused_loss"]
    assert summary["attention"] == ("fastft" if arch != "gemma2" else f"kept {kept!r}: attention logit softcapping 50.0")
    _assert_matches(_run(model, ids, labels), want)
    fastft.unpatch_model(model)
    again = _run(model, ids, labels)
    assert torch.equal(again[0], want[0]) and torch.equal(again[1], want[1])
    assert all(torch.equal(again[2][n], g) for n, g in want[2].items())


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma3_text"])
def test_patch_before_get_peft_model_matches(arch):
    base = tiny(arch)
    ids, labels = _batch(seed=7)
    want = _run(_peft(copy.deepcopy(base)), ids, labels)
    patched = _peft(fastft.patch_model(base))
    _assert_matches(_run(patched, ids, labels), want)
    fastft.unpatch_model(patched)
    assert torch.equal(_run(patched, ids, labels)[0], want[0])


@interpreter_only
@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_triton_kernels_wired_end_to_end(arch):
    """backend="triton" (interpreter): the patched model runs fastft's RMSNorm, RoPE and GLU kernels."""
    # (fastft.ops re-exports functions named like these modules: fetch the modules themselves)
    norm_ops, rope_ops, glu_ops = (importlib.import_module(f"fastft.ops.{m}") for m in ("rms_norm", "rope", "glu"))
    calls = []
    for mod, fn in ((norm_ops, "RMSNormFunction"), (rope_ops, "RoPEFunction"), (glu_ops, "GLUFunction")):
        cls = getattr(mod, fn)
        orig = cls.apply
        cls.apply = (lambda orig, fn: lambda *a: calls.append(fn) or orig(*a))(orig, fn)
    try:
        model = _peft(tiny(arch))
        ids, labels = _batch(seq=6)
        want = _run(model, ids, labels)
        fastft.patch_model(model, backend="triton")
        _assert_matches(_run(model, ids, labels), want)
        fastft.unpatch_model(model)
    finally:
        for mod, fn in ((norm_ops, "RMSNormFunction"), (rope_ops, "RoPEFunction"), (glu_ops, "GLUFunction")):
            del getattr(mod, fn).apply  # back to the autograd.Function's own classmethod
    assert {"RMSNormFunction", "RoPEFunction", "GLUFunction"} <= set(calls)


def test_training_steps_converge_like_unpatched():
    """30 AdamW steps from the same seed, patched vs unpatched: the loss curves and the adapters stay together
    (fp32; Liger's convergence tests use the same kind of bounds)."""

    def train(patch):
        model = _peft(tiny("llama", num_hidden_layers=1))
        if patch:
            fastft.patch_model(model)
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
        losses = []
        for step in range(30):
            ids, labels = _batch(seed=100 + step % 5, batch=2, seq=8)
            loss = model(input_ids=ids, labels=labels).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
        return torch.tensor(losses), {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}

    ref_losses, ref_params = train(False)
    losses, params = train(True)
    assert ref_losses[-1] < ref_losses[0] - 0.1  # it trains at all
    assert torch.allclose(losses, ref_losses, rtol=1e-4, atol=1e-5), (losses - ref_losses).abs().max()
    for name, p in params.items():
        assert torch.allclose(p, ref_params[name], rtol=1e-3, atol=5e-5), name


def test_gradient_accumulation_with_num_items_equals_one_big_batch():
    """4 micro-batches with unequal counts of labelled tokens, each loss divided by the whole batch's count
    (transformers' num_items_in_batch): the summed gradients are those of one batch holding all of them."""
    model = fastft.patch_model(_peft(tiny("qwen3")))
    g = torch.Generator().manual_seed(9)
    micro = []
    for rows, prompt in ((1, 2), (2, 7), (1, 5), (3, 0)):
        ids = torch.randint(0, 128, (rows, 10), generator=g)
        labels = ids.clone()
        labels[:, :prompt] = -100
        labels[-1, -2:] = -100  # padding at the end of the last row
        micro.append((ids, labels))
    num_items = sum(int((F.pad(lab, (0, 1), value=-100)[..., 1:] != -100).sum()) for _, lab in micro)
    counts = {int((F.pad(lab, (0, 1), value=-100)[..., 1:] != -100).sum()) for _, lab in micro}
    assert len(counts) == 4  # unequal token counts

    params = [p for p in model.parameters() if p.requires_grad]
    total = 0.0
    for ids, labels in micro:
        loss = model(input_ids=ids, labels=labels, num_items_in_batch=torch.tensor(num_items)).loss
        loss.backward()
        total += loss.item()
    accumulated = [p.grad.clone() for p in params]
    model.zero_grad(set_to_none=True)
    big = model(input_ids=torch.cat([i for i, _ in micro]), labels=torch.cat([lab for _, lab in micro])).loss
    big.backward()
    assert abs(total - big.item()) <= 1e-5 * big.item()
    for acc, p in zip(accumulated, params):
        assert rel_err(acc, p.grad) <= 1e-5
    # without num_items each micro-batch is its own mean: a different (wrong) total, so the check above can fail
    model.zero_grad(set_to_none=True)
    naive = sum(model(input_ids=i, labels=lab).loss.item() / 4 for i, lab in micro)
    assert abs(naive - big.item()) > 1e-3


def test_return_dict_false_and_shift_labels():
    model = fastft.patch_model(tiny("mistral"))
    ids, labels = _batch()
    want = model(input_ids=ids, labels=labels).loss
    unpatched = fastft.unpatch_model(copy.deepcopy(model))(input_ids=ids, labels=labels, return_dict=False)
    out = model(input_ids=ids, labels=labels, return_dict=False)
    assert torch.equal(out[0], want) and out[1] is None  # logits' place kept, as unpatched: (loss, logits, cache)
    assert len(out) == len(unpatched) and type(out[2]) is type(unpatched[2])
    shifted = F.pad(labels, (0, 1), value=-100)[..., 1:]
    assert torch.equal(model(input_ids=ids, shift_labels=shifted).loss, want)
    with pytest.raises(ValueError, match="logits_to_keep must be 0"):
        model(input_ids=ids, labels=labels, logits_to_keep=1)


def test_loss_false_keeps_the_models_head_and_loss_with_the_layer_kernels():
    """A trainer that reads the logits while training (TRL's SFTTrainer up to 1.9: token accuracy and entropy from
    outputs.logits) failed on the fused loss's logits=None and cannot pass skip_logits: loss=False leaves the
    causal LM's forward alone."""
    reference = _peft(tiny("llama"))
    model = fastft.patch_model(copy.deepcopy(reference), loss=False)
    summary = model.get_base_model()._fastft_patch.summary
    assert not summary["fused_loss"] and summary["rms_norm"] > 0 and summary["glu_mlp"] > 0
    ids, labels = _batch()
    want = _run(reference, ids, labels)
    logits, loss, grads, logits_with_labels = _run(model, ids, labels)
    assert logits_with_labels is not None
    assert rel_err(logits_with_labels.detach(), want[3].detach()) <= TOL[torch.float32]
    assert abs(loss.item() - want[1].item()) <= 1e-5 * abs(want[1].item())
    for name, g in grads.items():
        assert rel_err(g, want[2][name]) <= 1e-4, name
    fastft.unpatch_model(model)
    assert fastft.patch_model(model).get_base_model()._fastft_patch.summary["fused_loss"]
    with pytest.raises(TypeError, match="`loss` must be True or False"):
        fastft.patch_model(tiny("llama"), loss="no")


def test_unsupported_architecture_is_refused_untouched():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=2))
    with pytest.raises(ValueError, match="'gpt2' is not supported; supported model types: gemma, gemma2, gemma3_text, "
                                         "granite, llama, mistral, mixtral, olmo2, phi3, qwen2, qwen3, qwen3_moe, "
                                         "smollm3$"):
        fastft.patch_model(model)
    assert not hasattr(model, "_fastft_patch")


def test_unsupported_activation_and_double_patch_leave_model_as_it_was():
    model = tiny("llama", hidden_act="gelu")
    classes = [type(m) for m in model.modules()]
    with pytest.raises(ValueError, match="config.hidden_act='gelu' has no fused GLU"):
        fastft.patch_model(model)
    assert [type(m) for m in model.modules()] == classes
    model = fastft.patch_model(tiny("qwen2"))
    with pytest.raises(ValueError, match="already patched"):
        fastft.patch_model(model)
    fastft.unpatch_model(model)
    with pytest.raises(ValueError, match="is not patched"):
        fastft.unpatch_model(model)
    with pytest.raises(ValueError, match="`backend` must be one of"):
        fastft.patch_model(model, backend="cuda")


def test_rope_is_routed_per_patched_instance(monkeypatch):
    """A patched model's attention runs fastft's RoPE; transformers' module is not touched, so another Llama in
    the process keeps transformers' own function."""
    import transformers.models.llama.modeling_llama as llama

    from fastft.integration.patching import rope_binding

    original = llama.apply_rotary_pos_emb
    ids = _batch()[0]
    other = tiny("llama")
    with torch.no_grad():
        before = other(input_ids=ids).logits
    calls = []
    real = rope_binding.rope
    monkeypatch.setattr(rope_binding, "rope", lambda *a, **k: calls.append(1) or real(*a, **k))
    patched = fastft.patch_model(tiny("llama"))
    with torch.no_grad():
        patched(input_ids=ids)
        assert len(calls) == 2  # one per layer
        assert torch.equal(other(input_ids=ids).logits, before)
    assert len(calls) == 2  # the unpatched model used transformers' function
    assert llama.apply_rotary_pos_emb is original
    fastft.unpatch_model(patched)


def test_patched_model_compiles_without_graph_breaks_in_the_layers():
    """torch.compile sees plain functions: no graph break from the patching itself (class swaps, the rebound
    attention forward, the fused-loss forward)."""
    import torch._dynamo

    model = fastft.patch_model(tiny("llama", num_hidden_layers=1))
    ids, labels = _batch(seq=6)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(input_ids=ids, labels=labels)
    reasons = [str(r.reason) for r in explained.break_reasons]
    assert not any("fastft" in r or "ContextVar" in r or "dataclass" in r for r in reasons), reasons
    torch._dynamo.reset()


@pytest.mark.slow
def test_smollm2_patched_matches_unpatched():
    from fastft.apps.models import load_causal_lm

    model, tokenizer = load_causal_lm()
    model = first_layers(model).train()  # (no dropout) the patched forward fuses the loss in training mode
    batch = tokenizer(["The quick brown fox jumps over the lazy dog.", "LoRA adapts a model."],
                      return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    torch.manual_seed(0)
    model = fastft.get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj",
                                                                                       "down_proj", "lm_head"]))
    randomize_lora_B(model, std=0.02)

    def run():
        model.zero_grad(set_to_none=True)
        out = model(**batch, labels=labels)
        out.loss.backward()
        logits = out.logits
        if logits is None:  # patched: the fused loss made none
            with torch.no_grad():
                logits = model(**batch).logits
        return logits, out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    want = run()
    fastft.patch_model(model)
    assert model.get_base_model()._fastft_patch.summary["rms_norm"] == 2 * 6 + 1  # two per layer + the final one
    got = run()
    fastft.unpatch_model(model)
    mask = batch["attention_mask"].bool()
    assert rel_err(got[0][mask], want[0][mask]) <= 1e-5
    assert abs(got[1].item() - want[1].item()) <= 1e-5 * want[1].item()
    for name, g in got[2].items():
        assert rel_err(g, want[2][name]) <= 1e-4, name


def test_positional_arguments_reach_the_same_forward():
    model = fastft.patch_model(tiny("llama"))
    ids, labels = _batch()
    mask = torch.ones_like(ids)
    want = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    assert torch.equal(model(ids, mask, labels=labels).loss, want)
    with torch.no_grad():
        assert torch.equal(model(ids, mask).logits, model(input_ids=ids, attention_mask=mask).logits)


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_patched_bf16_on_gpu_matches_unpatched(arch):
    """On the GPU the patched model runs the Triton layer kernels, fastft attention and the fused loss, in bf16."""
    model = _peft(tiny(arch).to("cuda", torch.bfloat16))
    ids, labels = (t.cuda() for t in _batch(seq=64))
    want = _run(model, ids, labels)
    fastft.patch_model(model)
    got = _run(model, ids, labels)
    assert got[3] is None
    assert rel_err(got[0], want[0]) <= TOL[torch.bfloat16]
    assert abs(got[1].item() - want[1].item()) <= 1e-2 * abs(want[1].item())
    for name, g in got[2].items():
        assert rel_err(g, want[2][name]) <= 5e-2, name


def test_qlora_model_patched_matches_unpatched():
    """NF4 base layers (fastft.quantize_model) with LoRA through fastft.get_peft_model: the patched MLP and
    attention call the QLoRA layers as they are."""
    model = _peft(fastft.quantize_model(tiny("llama", num_hidden_layers=1)))
    ids, labels = _batch(seq=8)
    want = _run(model, ids, labels)
    fastft.patch_model(model)
    _assert_matches(_run(model, ids, labels), want)


def test_a_head_size_fastft_attention_does_not_take_keeps_the_models_attention():
    """head_dim 8 (tiny test models): the norms, RoPE and MLP are patched, the attention stays the model's own
    (every forward would otherwise fail in flash_attention), said in the summary."""
    model = tiny("llama", head_dim=8)
    kept = model.config._attn_implementation
    ids, labels = _batch()
    want = model(input_ids=ids, labels=labels).loss
    fastft.patch_model(model)
    assert model._fastft_patch.summary["attention"] == f"kept {kept!r}: head_dim 8 (fastft attention takes multiples " \
                                                       "of 8 in [16, 256])"
    assert model.config._attn_implementation == kept
    assert torch.allclose(model(input_ids=ids, labels=labels).loss, want, rtol=1e-5)


@pytest.mark.parametrize("hooked", ["lm_head", "lm_head.lora_B"])
def test_a_hooked_lm_head_is_called_not_fused(hooked):
    """The fused loss reads lm_head's weights instead of calling it: a forward hook on it (a logit transform,
    logging, accelerate's device_map hook) was skipped and the loss differed (0.0137). A hooked head is called,
    as unpatched, with a warning saying why."""
    model = _peft(tiny("llama"))
    patched = fastft.patch_model(copy.deepcopy(model))
    ids, labels = _batch()
    calls = []
    for m in (model, patched):
        head = m.get_submodule(f"base_model.model.{hooked}" if "." in hooked else "base_model.model.lm_head")
        head = head["default"] if "." in hooked else head
        head.register_forward_hook(lambda mod, args, out: (calls.append(1), out * 0.5)[1])
    want = model(input_ids=ids, labels=labels).loss
    with pytest.warns(UserWarning, match="computes its loss unfused.*has a forward hook"):
        got = patched(input_ids=ids, labels=labels).loss
    assert len(calls) == 2
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("change", ["hook", "replaced"])
def test_a_hooked_or_replaced_act_fn_is_called_as_unpatched(change):
    """The fused GLU computes the config's activation without calling mlp.act_fn: a hook on it was skipped (logits
    0.056 off), and an act_fn replaced after loading (ReLU-fication) was ignored. Then the model's own MLP runs."""
    from fastft.modules import fused_layers

    model = tiny("llama").eval()
    patched = fastft.patch_model(copy.deepcopy(model))
    ids, _ = _batch()
    fused = []
    swiglu = fused_layers.swiglu
    with pytest.MonkeyPatch.context() as mp:  # untouched, the patched MLP runs the fused op (no silent fallback)
        mp.setattr(fused_layers, "swiglu", lambda *a, **k: fused.append(1) or swiglu(*a, **k))
        patched(input_ids=ids)
    assert len(fused) == 2
    calls = []
    for m in (model, patched):
        for layer in m.model.layers:
            if change == "hook":
                layer.mlp.act_fn.register_forward_hook(lambda mod, args, out: (calls.append(1), out * 0.5)[1])
            else:
                layer.mlp.act_fn = torch.nn.ReLU()
    want, got = model(input_ids=ids).logits, patched(input_ids=ids).logits
    assert len(calls) == (4 if change == "hook" else 0)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_a_backward_hook_on_lm_head_lora_is_honoured():
    """nn.Module's call runs backward hooks too: one on lm_head's lora_A was skipped by the fused loss (gradients
    0.24 off); the hooked head is called."""
    model = _peft(tiny("llama"))
    patched = fastft.patch_model(copy.deepcopy(model))
    ids, labels = _batch()
    calls, grads = [], []
    for m in (model, patched):
        a = m.get_submodule("base_model.model.lm_head.lora_A")["default"]
        a.register_full_backward_hook(lambda mod, gin, gout: calls.append(m is patched))
        m(input_ids=ids, labels=labels).loss.backward()
        grads.append({n: p.grad for n, p in m.named_parameters() if p.requires_grad})
    assert calls == [False, True]
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("remove_hooks", [False, True])
def test_unpatch_after_accelerate_hooks_gives_the_unpatched_model(remove_hooks):
    """accelerate's cpu_offload keeps each forward it wraps as a method bound at that time (`_old_forward`): after
    unpatch_model the patched forwards ran on the unpatched modules (TypeError / AttributeError), with the hooks or
    after removing them. Patching after the hooks fused nothing."""
    from accelerate import cpu_offload
    from accelerate.hooks import remove_hook_from_submodules

    from fastft.modules.fused_layers import FusedRMSNormForward

    ids, _ = _batch()
    want = tiny("llama").eval()(input_ids=ids).logits
    model = fastft.patch_model(tiny("llama").eval())
    cpu_offload(model, execution_device=torch.device("cpu"))
    if remove_hooks:
        remove_hook_from_submodules(model)
    fastft.unpatch_model(model)
    torch.testing.assert_close(model(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)
    model = tiny("llama").eval()
    cpu_offload(model, execution_device=torch.device("cpu"))
    fastft.patch_model(model)
    assert model.model.norm._old_forward.__func__ is FusedRMSNormForward.forward
    torch.testing.assert_close(model(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("num_items", [torch.tensor(0), 0])
def test_an_accumulated_batch_without_targets_gives_zero_loss(num_items):
    """Trainer passes num_items_in_batch = 0 when every label of the accumulated batch is ignored (a cut answer): a
    loss of 0 with zero gradients (transformers' own mean gives NaN, which Trainer's logging hides), not an error."""
    model = fastft.patch_model(_peft(tiny("qwen3"))).train()
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(3))
    loss = model(input_ids=ids, labels=torch.full_like(ids, -100), num_items_in_batch=num_items).loss
    loss.backward()
    assert loss.item() == 0.0
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is None or not g.any() for g in grads)
