"""Prefix tuning's room: peft's `PrefixTuningConfig` accepted; the prefix fed straight to fastft's attention op.

Config: peft's PrefixTuningConfig (CAUSAL_LM, decoder-only models whose attention modules carry `layer_idx`).
Layer: the attention op itself — `fastft.ops.flash_attention(q, k, v, prefix_k=, prefix_v=)` attends every query
to the layer's P virtual keys/values unmasked, with no concatenated K/V and no cache object; the integration
(fastft/integration/attention.py) reads them from the `fastft_prefix` keyword that transformers hands down to
the attention interface. Gradients reach the prefix through the op.
Injection: peft builds its PeftModelForCausalLM (its PrefixEncoder, its state dict and save format unchanged);
`FastftPrefixModel` replaces the forward: the prefix encoder's output (1, P, layers·2·kv_heads·head_dim) is viewed
per layer as (1, P, kv_heads, head_dim) keys and values (views, no copies), real tokens are placed after the
prefix as peft's cache path does (P, P+1, …; OPT counts them over the attention mask, so a left-padded row's
too), and the model runs with attn_implementation="fastft". A KV cache (`past_key_values`, `use_cache`,
`generate`) holds the real tokens only: the op adds the prefix at every step, so cached decoding costs O(1) forwards
per token (peft's own cache path loses the prefix under transformers 5).
"""
from __future__ import annotations

import inspect

import torch
from peft import PeftModel, PeftModelForCausalLM, PrefixTuningConfig
from torch import nn

from fastft.integration.attention import NAME, prefix_expected  # importing registers "fastft"
from fastft.integration.base_layers import attribute_set
from fastft.integration.checkpointing import reentrant_layers
from fastft.integration.methods.generation import (NoContinuousBatching, counts_positions_over_mask,
                                                   generate_adjusting_inputs, paged_cache_asked, positions_over_mask,
                                                   refuse_continuous_batching)
from fastft.integration.methods.prompt import ReloadKeepsEncoders


# model types whose attention does more with its cached keys and values than attend to them, or whose layers do not
# hand the prefix on: the prefix given to the op beside the cache would be another model (found by a registry sweep)
_UNSUPPORTED = {
    "diffllama": "its attention splits the cached values in two halves, which the prefix handed to the op is not",
    "doge": "its attention biases each cached key by its value, which the prefix handed to the op would not get",
    "hrm_text": ("its recurrent stack applies each attention module several times, each with its own cache slot "
                 "(a prefix each), which the op's one prefix a module cannot give"),
    "stablelm": ("its decoder layers do not pass keyword arguments on to their attention, so the prefix would "
                 "never reach it"),
}


def validate_prefix_config(config, model: nn.Module) -> None:
    from peft.utils import TRANSFORMERS_MODELS_TO_PREFIX_TUNING_POSTPROCESS_MAPPING

    if not isinstance(config, PrefixTuningConfig):
        raise TypeError(f"validate_prefix_config expects a peft.PrefixTuningConfig, got {type(config).__name__}")
    task = getattr(config.task_type, "value", config.task_type)
    if task != "CAUSAL_LM":
        raise ValueError(f"PrefixTuningConfig.task_type={task!r} is not supported by fastft: expected 'CAUSAL_LM'")
    n = config.num_virtual_tokens
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:  # (True is an int: one token)
        raise ValueError(f"PrefixTuningConfig.num_virtual_tokens={config.num_virtual_tokens!r}: expected a positive "
                         "integer")
    model_type = getattr(getattr(model, "config", None), "model_type", "")
    if model_type in TRANSFORMERS_MODELS_TO_PREFIX_TUNING_POSTPROCESS_MAPPING or "gemma" in model_type:
        raise ValueError(f"fastft prefix tuning: model_type {model_type!r} reshapes its prefix cache in peft; "
                         "use peft directly for it")
    attn = [m for n, m in model.named_modules() if n.endswith("self_attn")]
    if not attn or not all(hasattr(m, "layer_idx") for m in attn):
        raise ValueError(f"fastft prefix tuning needs a decoder whose self_attn modules carry layer_idx (Llama "
                         f"family); {type(model).__name__} has none")
    why = _UNSUPPORTED.get(model_type)
    if why is None and getattr(model.config, "kv_lora_rank", None) is not None:
        why = ("its multi-head latent attention gives keys and values different head sizes, which peft's prefix "
               "(one size for both) does not have")
    decoder = _decoder(model)
    if why is None and "position_ids" not in inspect.signature(decoder.forward).parameters:
        why = (f"its decoder ({type(decoder).__name__}) takes no position_ids: it counts positions from its cache, "
               "so the real tokens could not be placed after the prefix")
    if why is not None:
        raise ValueError(f"fastft prefix tuning does not support {type(model).__name__}: {why}; use peft's own "
                         "prefix tuning (peft.get_peft_model, or implementation='peft')")


class FastftPrefixModel(ReloadKeepsEncoders, NoContinuousBatching, PeftModelForCausalLM):
    """peft's causal-LM PeftModel whose prefix-tuning forward hands the prefix to the fastft attention op."""

    def prefix_key_values(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer (prefix_k, prefix_v), each (1, P, kv_heads, head_dim): views of the encoder's output."""
        config = self.active_peft_config
        encoder = self.prompt_encoder[self.active_adapter]
        P = config.num_virtual_tokens
        if config.inference_mode:
            table = encoder.embedding.weight[None]
        else:
            tokens = self.prompt_tokens[self.active_adapter][:P].unsqueeze(0).to(encoder.embedding.weight.device)
            table = encoder(tokens)
        if self.base_model_torch_dtype is not None:
            table = table.to(self.base_model_torch_dtype)
        heads = config.num_attention_heads
        table = table.view(1, P, config.num_layers * 2, heads, config.token_dim // heads)
        return [(table[:, :, 2 * i], table[:, :, 2 * i + 1]) for i in range(config.num_layers)]

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, labels=None, output_attentions=None,
                output_hidden_states=None, return_dict=None, task_ids=None, **kwargs):
        config = self.active_peft_config
        if not isinstance(config, PrefixTuningConfig) or _attention_implementation(self.get_base_model()) != "fastft":
            return super().forward(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                                   labels=labels, output_attentions=output_attentions,
                                   output_hidden_states=output_hidden_states, return_dict=return_dict,
                                   task_ids=task_ids, **kwargs)
        ref = input_ids if input_ids is not None else inputs_embeds
        # peft's cache path puts the real tokens after the prefix: the positions the model gives them with P tokens
        # before them, and the caller's own position_ids (packed documents restart at 0) shifted by P likewise. A
        # KV cache holds real tokens only.
        position_ids = kwargs.get("position_ids")
        if position_ids is None:
            cache = kwargs.get("cache", kwargs.get("past_key_values"))  # transformers 5.24 renames it `cache`
            kwargs["position_ids"] = _positions_after_prefix(self.get_base_model(), ref, attention_mask,
                                                             _cached_tokens(cache), config.num_virtual_tokens)
        else:
            kwargs["position_ids"] = position_ids + config.num_virtual_tokens
        # training builds no cache
        kwargs.setdefault("use_cache", kwargs.get("cache", kwargs.get("past_key_values")) is not None)
        prefix = self.prefix_key_values()
        if torch.is_grad_enabled() and prefix[0][0].requires_grad:
            _refuse_reentrant_checkpointing(self.get_base_model())
        with prefix_expected():
            return self.base_model(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                                   labels=labels, output_attentions=output_attentions,
                                   output_hidden_states=output_hidden_states, return_dict=return_dict,
                                   fastft_prefix=prefix, **kwargs)

    def generate(self, *args, **kwargs):
        """Generation with the prefix through the fastft attention op, as the forward runs it: the KV cache holds
        the real tokens and the op adds the prefix at every step. peft's own cache path drops the prefix under
        transformers 5 (it reads `past_key_values`, which transformers no longer passes): the base model's tokens."""
        config = self.active_peft_config
        base = self.get_base_model()
        if self._adapters_disabled:  # peft's disable_adapter() swaps the forward only: generate as the base model
            return base.generate(*args, **kwargs)
        if not isinstance(config, PrefixTuningConfig):
            return super().generate(*args, **kwargs)
        if paged_cache_asked(base, kwargs):
            raise refuse_continuous_batching(self, 'generate(cache_implementation="paged")')
        previous = _attention_implementation(base)
        if previous != NAME:
            # switched away since get_peft_model (unpatch_model, set_attn_implementation): peft's generate would
            # drop the prefix, so this call runs through fastft attention and then puts the setting back
            base.set_attn_implementation(NAME)
        try:
            return self._generate_with_prefix(base, config, args, kwargs)
        finally:
            if previous != NAME:
                base.set_attn_implementation(previous)

    def _generate_with_prefix(self, base: nn.Module, config: PrefixTuningConfig, args: tuple, kwargs: dict):
        P, prefix = config.num_virtual_tokens, self.prefix_key_values()

        def with_prefix(inputs: dict) -> dict:
            positions = inputs.get("position_ids")
            if positions is None:  # transformers passes them (padding-aware); else count from the cache
                ref = inputs.get("input_ids")
                ref = inputs["inputs_embeds"] if ref is None else ref
                start = _cached_tokens(inputs.get("cache", inputs.get("past_key_values")))
                positions = torch.arange(start, start + ref.shape[1], device=ref.device)[None].expand(ref.shape[0], -1)
            inputs["position_ids"] = positions + P  # the real tokens sit after the prefix, as in the forward
            inputs["fastft_prefix"] = prefix
            return inputs

        with prefix_expected():
            return generate_adjusting_inputs(base, with_prefix, args, kwargs)


def _refuse_reentrant_checkpointing(model: nn.Module) -> None:
    """Reentrant checkpointing recomputes a layer from its positional inputs only; the prefix reaches each layer by
    keyword, so its backward runs the prefix encoder's graph once per layer ("backward through the graph a second
    time")."""
    if any(reentrant_layers(model, training_only=True)):
        raise ValueError(f"fastft prefix tuning: {type(model).__name__} has reentrant gradient checkpointing "
                         "(use_reentrant=True, torch's default when not given), which cannot pass gradients to "
                         "the prefix; enable it with gradient_checkpointing_kwargs={\"use_reentrant\": False}")


def _positions_after_prefix(model: nn.Module, ref: torch.Tensor, attention_mask, cached: int, P: int) -> torch.Tensor:
    """(batch, seq) positions of the real tokens as `model` derives them itself when given none, with peft's P prefix
    tokens before them (peft passes them as a P-token cache and prepends P ones to the attention mask).

    The Llama family counts from the cache, ignoring the mask: P + cached, P + cached + 1, ... for every row. OPT
    counts the mask's kept tokens (cumsum(mask) * mask - 1 over the P-extended mask, pads at -1), so a left-padded
    row's real tokens sit at P, P + 1, ... as when the row runs alone."""
    batch, seq = ref.shape[0], ref.shape[1]
    if attention_mask is not None and attention_mask.dim() == 2 and counts_positions_over_mask(model):
        return positions_over_mask(attention_mask, before=P)[:, cached:]  # the mask: (batch, cached + seq)
    start = P + cached
    return torch.arange(start, start + seq, device=ref.device).unsqueeze(0).expand(batch, -1)


def _cached_tokens(cache) -> int:
    """How many real tokens a transformers Cache already holds (0 without one)."""
    if cache is None:
        return 0
    if not hasattr(cache, "get_seq_length"):
        raise TypeError(f"fastft prefix tuning: past_key_values must be a transformers Cache (DynamicCache, ...), "
                        f"got {type(cache).__name__}")
    return int(cache.get_seq_length())


def _decoder(model: nn.Module) -> nn.Module:
    return model.get_decoder() if hasattr(model, "get_decoder") else model


def _attention_implementation(model: nn.Module) -> str:
    """The attention implementation of the layers the prefix goes to: a multimodal model's text decoder (GOT-OCR2's
    top config keeps its vision tower's "eager" while the decoder runs fastft)."""
    return _decoder(model).config._attn_implementation


def _use_fastft(model: PeftModel) -> PeftModel:
    base = model.get_base_model()
    base.set_attn_implementation(NAME)
    decoder = _decoder(base)
    if _attention_implementation(base) != NAME:  # transformers only logs it for a hand-written attention
        raise ValueError(f"fastft prefix tuning: {type(decoder).__name__} does not take attn_implementation='fastft' "
                         "(its attention does not use transformers' attention interface), which hands the prefix "
                         "to the attention; use peft's own prefix tuning (peft.get_peft_model, or "
                         "implementation='peft')")
    layers = model.active_peft_config.num_layers
    deepest = max(m.layer_idx for n, m in decoder.named_modules() if n.endswith("self_attn"))
    if deepest >= layers:  # Whisper's decoder: peft counts config.num_hidden_layers, the encoder's depth
        raise ValueError(f"fastft prefix tuning: PrefixTuningConfig.num_layers={layers} (peft's count, from the "
                         f"model config) is fewer than the {deepest + 1} attention layers of {type(decoder).__name__}; "
                         f"give PrefixTuningConfig(num_layers={deepest + 1}, ...) to fastft.get_peft_model")
    model.__class__ = FastftPrefixModel
    return model


def _checkpointing_hidden(model: nn.Module):
    """peft refuses prefix tuning on a model with gradient checkpointing on (its prefix lives in the KV cache, which
    checkpointing drops); fastft hands the prefix to the op instead and runs under non-reentrant checkpointing (the
    forward refuses reentrant): the flags are hidden from peft while it builds, whichever order the user took."""
    return attribute_set([m for m in model.modules() if getattr(m, "gradient_checkpointing", False) is True],
                         "gradient_checkpointing", False)


def get_prefix_model(model: nn.Module, config: PrefixTuningConfig, adapter_name: str = "default", **kwargs):
    from fastft.integration.peft_lora import quiet_peft_model

    validate_prefix_config(config, model)
    with _checkpointing_hidden(model):
        built = quiet_peft_model(model, config, adapter_name, **kwargs)
    return _use_fastft(built)


def load_prefix_adapter(model: nn.Module, path, config: PrefixTuningConfig, adapter_name: str, is_trainable: bool):
    """Onto a plain transformers model, or as another adapter into a fastft prefix model (set_adapter switches)."""
    if isinstance(model, PeftModel) and not isinstance(model, FastftPrefixModel):
        raise ValueError(f"load_adapter: a prefix-tuning adapter loads into a plain transformers model or a fastft "
                         f"prefix-tuning model, not into a {type(model).__name__}")
    from fastft.integration.methods.prompt import check_prompt_geometry, load_prompt_learning

    base = model.get_base_model() if isinstance(model, PeftModel) else model
    validate_prefix_config(config, base)
    check_prompt_geometry(config, base, path)
    with _checkpointing_hidden(base):
        loaded = load_prompt_learning(model, path, adapter_name, is_trainable)
    return loaded if loaded is model else _use_fastft(loaded)
