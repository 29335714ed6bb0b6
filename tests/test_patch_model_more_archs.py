"""fastft.patch_model on the architectures beyond tests/test_patch_model.py's six: Gemma 1, Phi-3 (fused qkv and
gate_up projections, partial rotary), SmolLM3 (no-RoPE layers), OLMo2 (post-norms, q/k norms over all heads,
fp32 norm rounding), Granite (logits scaling, embedding / residual / attention multipliers), Mixtral and
Qwen3-MoE (sparse MoE blocks left alone, the router's load-balancing loss added to the fused loss).

Each: patched vs unpatched logits, loss and every LoRA gradient (fastft.get_peft_model, LoRA on every linear
layer the architecture has and on lm_head), in fp32 with the torch backend, and unpatch restores bit-identical
outputs; one Triton-interpreter run per new kernel path (partial rotary with fused projections' views, OLMo2's
rounding).
"""
import copy

import pytest
import torch
from peft import LoraConfig

import fastft
from tests.test_patch_model import _assert_matches, _batch, _run
from tests.utils import interpreter_only, randomize_lora_B

COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
              eos_token_id=2)
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]

# name -> (config class, model class, config overrides, LoRA targets besides lm_head)
CASES = {
    "gemma": ("GemmaConfig", "GemmaForCausalLM", dict(hidden_act="gelu_pytorch_tanh"), ATTENTION + MLP),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(partial_rotary_factor=0.5),
             ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]),
    "phi3_full_rotary": ("Phi3Config", "Phi3ForCausalLM", {}, ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]),
    "smollm3": ("SmolLM3Config", "SmolLM3ForCausalLM", dict(no_rope_layers=[1, 0]), ATTENTION + MLP),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", {}, ATTENTION + MLP),
    "granite": ("GraniteConfig", "GraniteForCausalLM",
                dict(logits_scaling=4.0, embedding_multiplier=3.0, residual_multiplier=0.5, attention_multiplier=0.1),
                ATTENTION + MLP),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM",
                dict(num_local_experts=4, num_experts_per_tok=2, output_router_logits=True, router_aux_loss_coef=0.5),
                ATTENTION),
    # layer 1 dense (mlp_only_layers): its Qwen3MoeMLP stays the model's own too
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, mlp_only_layers=[1],
                       output_router_logits=True, router_aux_loss_coef=0.5), ATTENTION + MLP),
}
# patched per layer (2 RMSNorms and 1 gated MLP unless said here): OLMo2's and Qwen3's q/k norms; MoE blocks and
# Qwen3-MoE's dense MLP stay the model's own
NORMS = {"olmo2": 4, "qwen3_moe": 4}
MLPS = {"mixtral": 0, "qwen3_moe": 0}


def tiny(case: str, seed: int = 0, **overrides):
    import transformers as tf

    config_cls, model_cls, kw, _ = CASES[case]
    torch.manual_seed(seed)
    config = getattr(tf, config_cls)(**{**COMMON, **kw, **overrides})
    model = getattr(tf, model_cls)(config).train()
    with torch.no_grad():  # norms away from the identity (Gemma's 1 + w and Llama's w differ)
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.2)
    return model


def peft(model, case: str, seed: int = 3):
    torch.manual_seed(seed)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=CASES[case][3] + ["lm_head"])
    peft_model = fastft.get_peft_model(model, config)
    randomize_lora_B(peft_model)
    return peft_model


@pytest.mark.parametrize("case", list(CASES))
def test_patched_matches_unpatched_and_unpatch_restores(case):
    model = peft(tiny(case), case)
    ids, labels = _batch()
    want = _run(model, ids, labels)
    fastft.patch_model(model, backend="torch")
    summary = model.get_base_model()._fastft_patch.summary
    assert summary["model_type"] == case.removesuffix("_full_rotary")
    assert summary["rms_norm"] == 2 * NORMS.get(case, 2) + 1
    assert summary["glu_mlp"] == 2 * MLPS.get(case, 1) and summary["rope_attention"] == 2 and summary["fused_loss"]
    assert summary["attention"] == "fastft"
    _assert_matches(_run(model, ids, labels), want)
    fastft.unpatch_model(model)
    again = _run(model, ids, labels)
    assert torch.equal(again[0], want[0]) and torch.equal(again[1], want[1])
    assert all(torch.equal(again[2][n], g) for n, g in want[2].items())


@pytest.mark.parametrize("case", ["phi3", "granite", "mixtral"])
def test_patch_before_get_peft_model_matches(case):
    base = tiny(case)
    ids, labels = _batch(seed=7)
    want = _run(peft(copy.deepcopy(base), case), ids, labels)
    patched = peft(fastft.patch_model(base, backend="torch"), case)
    _assert_matches(_run(patched, ids, labels), want)
    fastft.unpatch_model(patched)
    assert torch.equal(_run(patched, ids, labels)[0], want[0])


@pytest.mark.parametrize("case", ["mixtral", "qwen3_moe"])
def test_moe_router_aux_loss_is_added_as_transformers_adds_it(case):
    """output_router_logits (config or call): loss = CE + router_aux_loss_coef · aux, with aux_loss and
    router_logits in the output; off: CE alone. The tuple (return_dict=False) keeps the unpatched layout."""
    model = tiny(case)
    ids, labels = _batch()
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # the load-balancing loss counts only attended tokens
    ref = copy.deepcopy(model)
    fastft.patch_model(model, backend="torch")
    for routed in (None, True, False):  # None: the config's (True here)
        want = ref(input_ids=ids, attention_mask=mask, labels=labels, output_router_logits=routed)
        got = model(input_ids=ids, attention_mask=mask, labels=labels, output_router_logits=routed)
        assert got.logits is None and type(got) is type(want)
        assert abs(got.loss.item() - want.loss.item()) <= 1e-5 * want.loss.item()
        if routed is False:
            assert got.aux_loss is None and got.router_logits is None
            continue
        assert torch.allclose(got.aux_loss, want.aux_loss, rtol=1e-6)
        assert len(got.router_logits) == len(want.router_logits) >= 1  # one per sparse layer
    ce = model(input_ids=ids, attention_mask=mask, labels=labels, output_router_logits=False).loss
    routed = model(input_ids=ids, attention_mask=mask, labels=labels)
    assert routed.aux_loss.item() > 0.1  # so the check above can fail
    assert torch.allclose(routed.loss, ce + model.config.router_aux_loss_coef * routed.aux_loss, rtol=1e-6)
    want = ref(input_ids=ids, labels=labels, return_dict=False)
    got = model(input_ids=ids, labels=labels, return_dict=False)
    assert len(got) == len(want) and got[2] is None  # (loss, aux_loss, logits, cache, router_logits)
    assert torch.allclose(got[1], want[1]) and type(got[3]) is type(want[3])


def test_granite_head_with_a_bias_keeps_the_models_own_loss():
    """Granite's fused loss divides the hidden states by logits_scaling, which is lm_head(h) / s only without a
    bias: a head with one keeps the model's own loss (one warning), the same value as unpatched."""
    model = tiny("granite", tie_word_embeddings=False)
    with torch.no_grad():
        model.lm_head.bias = torch.nn.Parameter(torch.randn(128) * 0.5)
    ids, labels = _batch()
    want = model(input_ids=ids, labels=labels).loss
    fastft.patch_model(model, backend="torch")
    with pytest.warns(UserWarning, match="scale the head's bias too"):
        out = model(input_ids=ids, labels=labels)
    assert out.logits is not None and torch.allclose(out.loss, want, rtol=1e-5)


def test_olmo2_norm_rounds_like_olmo2():
    """OLMo2's RMSNorm rounds w · x̂ once, in fp32 (Llama's rounds x̂ first): bit for bit in bf16."""
    model = tiny("olmo2").to(torch.bfloat16)
    norm = model.model.layers[0].post_attention_layernorm
    x = torch.randn(3, 5, 64, dtype=torch.bfloat16)
    want = norm(x)
    fastft.patch_model(model, backend="torch")
    assert type(norm).forward is not type(norm).__mro__[-2].forward  # (the patched forward runs)
    got = norm(x)
    assert got.dtype == want.dtype and torch.equal(got, want)


def test_smollm3_no_rope_layers_stay_without_rope(monkeypatch):
    """no_rope_layers [1, 0]: layer 0 rotates, layer 1 does not (the attention's own code decides)."""
    from fastft.integration.patching import rope_binding

    calls = []
    real = rope_binding.rope
    monkeypatch.setattr(rope_binding, "rope", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = fastft.patch_model(tiny("smollm3"), backend="torch")
    with torch.no_grad():
        model(input_ids=_batch()[0])
    assert len(calls) == 1


@interpreter_only
@pytest.mark.parametrize("case", ["phi3", "olmo2"])
def test_triton_kernels_wired_end_to_end(case, monkeypatch):
    """backend="triton" (interpreter): Phi-3's partial rotary and fused gate_up halves (views), OLMo2's rounding."""
    import importlib

    calls = []
    for module, fn in (("rms_norm", "RMSNormFunction"), ("rope", "RoPEFunction"), ("glu", "GLUFunction")):
        cls = getattr(importlib.import_module(f"fastft.ops.{module}"), fn)
        monkeypatch.setattr(cls, "apply", (lambda orig, fn: lambda *a: calls.append(fn) or orig(*a))(cls.apply, fn))
    model = peft(tiny(case, num_hidden_layers=1), case)
    ids, labels = _batch(seq=6)
    want = _run(model, ids, labels)
    fastft.patch_model(model, backend="triton")
    _assert_matches(_run(model, ids, labels), want)
    assert {"RMSNormFunction", "RoPEFunction", "GLUFunction"} <= set(calls)
