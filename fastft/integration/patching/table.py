"""The one table of what differs between the architectures `fastft.patch_model` supports.

Everything else is shared: every architecture here is a decoder of RMSNorms, an optional gated MLP and a RoPE
attention, swapped the same way (fastft.integration.patching.patch), with a *ForCausalLM head whose loss goes
through the fused cross-entropy. What stays untouched, on purpose: where the norms sit (pre-norm, OLMo2's
post-norms, Gemma's sandwich), embedding scaling (Gemma's `ScaledWordEmbedding` multiplies by √hidden inside its
own module, Granite's embedding multiplier), the decoder layers' residual adds (Granite's residual multiplier),
the rotary embedding module (its cos/sin feed fastft's RoPE kernel), which layers rotate at all (SmolLM3's no-RoPE
layers decide inside the attention's own code), the attention's `scaling` (Granite's attention multiplier) and
a sparse MoE block (router and experts: Mixtral, Qwen3-MoE).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Architecture:
    module: str  # transformers' modeling module
    norm: str  # RMSNorm class
    norm_offset: float  # y = (offset + w)·x̂: 0 Llama-style, 1 Gemma-style
    norm_cast: str  # ops.rms_norm rounding: "input" (x̂ in x's dtype, then · w) or "fp32" (w · x̂ in fp32)
    norm_eps_attr: str  # attribute holding eps on the norm module
    mlp: str | None  # gated MLP class; None: the feed-forward (a sparse MoE block) stays the model's own
    activation_attr: str  # config attribute naming the MLP activation
    attention: str  # attention class (calls the module's apply_rotary_pos_emb)
    causal_lm: str  # *ForCausalLM class whose loss goes through the fused cross-entropy
    fused_gate_up: bool = False  # MLP: one `gate_up_proj`, its output's halves gate, up (Phi-3); else gate/up_proj
    partial_rotary: bool = False  # the module's RoPE rotates each head's first cos.shape[-1] dims only (Phi-3)
    final_softcap_attr: str | None = None  # config attribute: logits = cap·tanh(logits / cap) before the loss
    logits_scaling_attr: str | None = None  # config attribute: logits = lm_head(h) / scaling before the loss
    # MoE: the modeling module's load-balancing function; with output_router_logits its value × router_aux_loss_coef
    # is added to the loss, as transformers' MoE heads do
    router_aux_loss: str | None = None
    attention_softcap_attr: str | None = None  # config attribute: when set, fastft attention is not used


_LLAMA_LIKE = dict(norm_offset=0.0, norm_cast="input", norm_eps_attr="variance_epsilon", activation_attr="hidden_act")
_GEMMA_LIKE = dict(norm_offset=1.0, norm_cast="fp32", norm_eps_attr="eps", activation_attr="hidden_activation",
                   final_softcap_attr="final_logit_softcapping", attention_softcap_attr="attn_logit_softcapping")
_MOE = dict(mlp=None, router_aux_loss="load_balancing_loss_func")


def _arch(family: str, prefix: str, causal_lm: str | None = None, **kw) -> Architecture:
    kw = {"mlp": f"{prefix}MLP", **(_GEMMA_LIKE if family.startswith("gemma") else _LLAMA_LIKE), **kw}
    return Architecture(module=f"transformers.models.{family}.modeling_{family}", norm=f"{prefix}RMSNorm",
                        attention=f"{prefix}Attention", causal_lm=causal_lm or f"{prefix}ForCausalLM", **kw)


# config.model_type -> its differences
ARCHITECTURES: dict[str, Architecture] = {
    "llama": _arch("llama", "Llama"),
    "mistral": _arch("mistral", "Mistral"),
    "qwen2": _arch("qwen2", "Qwen2"),
    "qwen3": _arch("qwen3", "Qwen3"),
    "smollm3": _arch("smollm3", "SmolLM3"),
    # Gemma 1: Gemma's (1 + w) norm and GeGLU, no softcapping, the activation under Llama's name
    "gemma": _arch("gemma", "Gemma", activation_attr="hidden_act", final_softcap_attr=None,
                   attention_softcap_attr=None),
    "gemma2": _arch("gemma2", "Gemma2"),
    "gemma3_text": _arch("gemma3", "Gemma3", causal_lm="Gemma3ForCausalLM"),
    "phi3": _arch("phi3", "Phi3", fused_gate_up=True, partial_rotary=True),
    # (w · x̂) in fp32, rounded once: Llama's w, Gemma's rounding
    "olmo2": _arch("olmo2", "Olmo2", norm_cast="fp32"),
    "granite": _arch("granite", "Granite", logits_scaling_attr="logits_scaling"),
    "mixtral": _arch("mixtral", "Mixtral", **_MOE),
    "qwen3_moe": _arch("qwen3_moe", "Qwen3Moe", **_MOE),
}

# MLP activation names (transformers' ACT2FN keys) -> fused GLU: False SwiGLU, True GeGLU (tanh approximation)
GELU_TANH = {"silu": False, "swish": False, "gelu_pytorch_tanh": True}
