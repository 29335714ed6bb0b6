"""The one table of what differs between the architectures `fastft.patch_model` supports.

Everything else is shared: every architecture here is a pre-norm decoder whose RMSNorm, gated MLP and attention
modules are swapped the same way (fastft.integration.patching.patch). What stays untouched, on purpose:
embedding scaling (Gemma's `ScaledWordEmbedding` multiplies by √hidden inside its own module), the decoder
layers' residual adds, the rotary embedding module (its cos/sin feed fastft's RoPE kernel).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Architecture:
    module: str  # transformers' modeling module
    norm: str  # RMSNorm class
    norm_offset: float  # y = (offset + w)·x̂: 0 Llama-style, 1 Gemma-style (and fp32 multiply, see ops.rms_norm)
    norm_eps_attr: str  # attribute holding eps on the norm module
    mlp: str  # gated MLP class (gate_proj, up_proj, down_proj)
    activation_attr: str  # config attribute naming the MLP activation
    attention: str  # attention class (calls the module's apply_rotary_pos_emb)
    causal_lm: str  # *ForCausalLM class whose loss goes through the fused cross-entropy
    final_softcap_attr: str | None = None  # config attribute: logits = cap·tanh(logits / cap) before the loss
    attention_softcap_attr: str | None = None  # config attribute: when set, fastft attention is not used


_LLAMA_LIKE = dict(norm_offset=0.0, norm_eps_attr="variance_epsilon", activation_attr="hidden_act")
_GEMMA_LIKE = dict(norm_offset=1.0, norm_eps_attr="eps", activation_attr="hidden_activation",
                   final_softcap_attr="final_logit_softcapping", attention_softcap_attr="attn_logit_softcapping")


def _arch(family: str, prefix: str, causal_lm: str | None = None, **kw) -> Architecture:
    kw = {**(_GEMMA_LIKE if family.startswith("gemma") else _LLAMA_LIKE), **kw}
    return Architecture(module=f"transformers.models.{family}.modeling_{family}", norm=f"{prefix}RMSNorm",
                        mlp=f"{prefix}MLP", attention=f"{prefix}Attention",
                        causal_lm=causal_lm or f"{prefix}ForCausalLM", **kw)


# config.model_type -> its differences
ARCHITECTURES: dict[str, Architecture] = {
    "llama": _arch("llama", "Llama"),
    "mistral": _arch("mistral", "Mistral"),
    "qwen2": _arch("qwen2", "Qwen2"),
    "qwen3": _arch("qwen3", "Qwen3"),
    "gemma2": _arch("gemma2", "Gemma2"),
    "gemma3_text": _arch("gemma3", "Gemma3", causal_lm="Gemma3ForCausalLM"),
}

# MLP activation names (transformers' ACT2FN keys) -> fused GLU: False SwiGLU, True GeGLU (tanh approximation)
GELU_TANH = {"silu": False, "swish": False, "gelu_pytorch_tanh": True}
