"""Prompt tuning's and P-tuning's room: peft's `PromptTuningConfig` / `PromptEncoderConfig` accepted.

These methods only prepend learned embeddings to the input (P-tuning computes them with a small MLP/LSTM
encoder): the cost is the base model on P more tokens, nothing a fused kernel changes. So the layer and the
injection are peft's own (PeftModelForCausalLM, its save format); fastft's entry point validates the config
with errors naming the field, and the model keeps whatever attention implementation it has (fastft's included).
`FastftPromptModel` only makes `generate` exact, with a KV cache (peft's cached generation is off under
transformers 5).
"""
from __future__ import annotations

import contextlib
import copy
from pathlib import Path

import torch
from peft import (PeftModel, PeftModelForCausalLM, PeftModelForSequenceClassification, PromptEncoderConfig,
                  PromptTuningConfig)
from torch import nn
from transformers import DynamicCache

from fastft.integration.methods.generation import (NoContinuousBatching, counts_positions_over_mask,
                                                   generate_adjusting_inputs, paged_cache_asked, positions_over_mask,
                                                   refuse_continuous_batching)

CONFIGS = (PromptTuningConfig, PromptEncoderConfig)
PACKED_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")  # fastft.integration.packing's


def validate_prompt_config(config, model: nn.Module) -> None:
    if not isinstance(config, CONFIGS):
        raise TypeError(f"validate_prompt_config expects a peft.PromptTuningConfig or PromptEncoderConfig, got "
                        f"{type(config).__name__}")
    name = type(config).__name__
    task = getattr(config.task_type, "value", config.task_type)
    if task not in ("CAUSAL_LM", "SEQ_CLS"):
        raise ValueError(f"{name}.task_type={task!r} is not supported by fastft: expected 'CAUSAL_LM' or 'SEQ_CLS'")
    n = config.num_virtual_tokens
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:  # (True is an int: one token)
        raise ValueError(f"{name}.num_virtual_tokens={config.num_virtual_tokens!r}: expected a positive integer")
    init = getattr(config, "prompt_tuning_init", None)
    if isinstance(config, PromptTuningConfig) and getattr(init, "value", init) == "TEXT" \
            and not config.tokenizer_name_or_path:
        raise ValueError(f"{name}.prompt_tuning_init='TEXT' needs tokenizer_name_or_path (the tokenizer that "
                         "encodes prompt_tuning_init_text)")
    if model.get_input_embeddings() is None:
        raise ValueError(f"{type(model).__name__} has no input embeddings for {name} to extend")


def refuse_packed(model: PeftModel, kwargs: dict) -> None:
    packed = [k for k in PACKED_KEYS if kwargs.get(k) is not None]
    if _restarts(kwargs.get("position_ids"), kwargs.get("attention_mask")):
        # transformers' DataCollatorWithFlattening marks documents by position_ids alone, which peft drops: the
        # documents of a row would attend to each other
        packed.append("position_ids restarting inside a row")
    if packed and not model._adapters_disabled and isinstance(model.active_peft_config, CONFIGS):
        # peft puts the virtual tokens in front of the row, and passes the documents' bounds on unchanged: they
        # end P tokens short (fastft's attention left those rows unwritten: NaN, a loss changing every call)
        raise ValueError(f"{type(model.active_peft_config).__name__}: a packed batch ({', '.join(packed)}) "
                         "cannot take prompt tuning's virtual tokens, which peft puts in front of the whole row, "
                         "not of each document; pad the batch instead (PackingCollator's documents one a row, as "
                         "fastft train runs prompt tuning)")


def _restarts(position_ids, attention_mask) -> bool:
    """Whether positions fail to rise by 1 between two real tokens of a row (several documents in it; a left-padded
    row's positions restart under its padding only)."""
    if not isinstance(position_ids, torch.Tensor) or position_ids.dim() != 2 or position_ids.shape[-1] < 2:
        return False
    steps = position_ids.diff(dim=-1) != 1
    if isinstance(attention_mask, torch.Tensor) and attention_mask.shape == position_ids.shape:
        real = attention_mask.bool()
        steps &= real[:, 1:] & real[:, :-1]
    return bool(steps.any())


class ReloadKeepsEncoders:
    """For the prompt-learning PeftModels: peft's `load_adapter` (transformers.Trainer's resume and best-model reload
    call it) refuses a reload that would put a saved table where an encoder's input goes."""

    def load_adapter(self, model_id, adapter_name, *args, **kwargs):
        refuse_reload_into_an_encoder(self, model_id, adapter_name)
        return super().load_adapter(model_id, adapter_name, *args, **kwargs)


class FastftPromptModel(ReloadKeepsEncoders, NoContinuousBatching, PeftModelForCausalLM):
    """peft's causal-LM PeftModel whose `generate` runs as its forward does: under transformers 5 (peft 0.21)
    peft's cached generation scores every token after the first away from what the forward gives (0.1-0.2 on a
    tiny Llama). Here the first step puts the virtual tokens in front (positions 0..P-1, the real tokens from P,
    padding or not, as peft's forward), the KV cache keeps them, and each later step runs one token at its
    position + P. A cache other than the default dynamic one (`cache_implementation`, a passed cache that is not
    an empty DynamicCache) would be sized without the P virtual tokens, or hold them from an earlier call: that
    generation recomputes the whole sequence each step, without the cache (the passed one is left untouched)."""

    def forward(self, *args, **kwargs):
        refuse_packed(self, kwargs)
        return super().forward(*args, **kwargs)

    def generate(self, *args, **kwargs):
        base = self.get_base_model()
        if self._adapters_disabled:  # peft's disable_adapter() swaps the forward only: generate as the base model
            return base.generate(*args, **kwargs)
        config = self.active_peft_config
        if not isinstance(config, CONFIGS):
            return super().generate(*args, **kwargs)
        if paged_cache_asked(base, kwargs):
            raise refuse_continuous_batching(self, 'generate(cache_implementation="paged")')
        P = config.num_virtual_tokens
        over_mask = counts_positions_over_mask(base)

        def with_prompt(inputs: dict) -> dict:
            ids, embeds = inputs.get("input_ids"), inputs.get("inputs_embeds")
            batch, seq = (ids if embeds is None else embeds).shape[:2]
            cache = inputs.get("cache", inputs.get("past_key_values"))
            start = 0 if cache is None else int(cache.get_seq_length())  # the virtual tokens included
            if start == 0:  # the first step (every step without a cache): the virtual tokens in front
                embeds = base.get_input_embeddings()(ids) if embeds is None else embeds
                prompts = self.get_prompt(batch_size=batch).to(embeds.dtype)
                inputs["input_ids"], inputs["inputs_embeds"] = None, torch.cat([prompts, embeds], dim=1)
                seq += P
            mask = inputs.get("attention_mask")
            if isinstance(mask, torch.Tensor) and mask.dim() == 2:
                inputs["attention_mask"] = torch.cat([mask.new_ones(batch, P), mask], dim=1)
            device = inputs["inputs_embeds" if ids is None or start == 0 else "input_ids"].device
            full = inputs.get("attention_mask")
            if over_mask and isinstance(full, torch.Tensor) and full.dim() == 2:
                # as OPT counts them in peft's forward (given none): over the kept tokens, virtual ones included,
                # so a left-padded row's real tokens follow its virtual ones
                inputs["position_ids"] = positions_over_mask(full)[:, -seq:]
            else:  # peft's forward passes none: positions count every token, virtual and padding included
                inputs["position_ids"] = torch.arange(start, start + seq, device=device)[None].expand(batch, -1)
            return inputs

        passed = kwargs.get("past_key_values", kwargs.get("cache"))
        if isinstance(passed, DynamicCache) and passed.get_seq_length() == 0:
            passed = None  # an empty dynamic cache: filled as the default one is
        if passed is not None and _continues(passed, P, args, kwargs):
            return generate_adjusting_inputs(base, with_prompt, args, kwargs)
        settings = kwargs.get("generation_config") or base.generation_config
        other_cache = kwargs.get("cache_implementation") or getattr(settings, "cache_implementation", None) \
            or passed is not None
        if kwargs.get("use_cache") is False or other_cache:
            if kwargs.get("assistant_model") is not None or kwargs.get("prompt_lookup_num_tokens") \
                    or getattr(settings, "prompt_lookup_num_tokens", None):
                raise ValueError("generate: prompt / P-tuning with a static or passed cache (or use_cache=False) "
                                 "recomputes every step without a KV cache (one would be sized without the virtual "
                                 "tokens), and assisted / prompt-lookup decoding needs one: drop cache_implementation "
                                 "and the passed cache, leave use_cache on (the default dynamic cache is exact), or "
                                 "drop the assistant")
            # a passed cache is left out: its length would count the virtual tokens against the real ones
            # (a cache from an earlier call) and every recomputed step would be appended to it. Through fastft's
            # per-call adjustment, not peft's generate: that swaps the shared base model's input preparation, and
            # took another request's still decoding away from it
            rest = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "cache", "cache_implementation")}
            return generate_adjusting_inputs(base, with_prompt, args, {**rest, "use_cache": False})
        return generate_adjusting_inputs(base, with_prompt, args, kwargs)


def _continues(cache, P: int, args: tuple, kwargs: dict) -> bool:
    """Whether a passed cache is continued the way transformers 5 restarts from one: input_ids the new tokens only,
    the attention mask over the whole conversation (cache + new). A DynamicCache this model filled holds the P
    virtual tokens first, which the mask (the caller's tokens) does not count."""
    ids = kwargs.get("input_ids", args[0] if args else None)
    mask = kwargs.get("attention_mask")
    return isinstance(cache, DynamicCache) and isinstance(ids, torch.Tensor) and ids.dim() == 2 \
        and isinstance(mask, torch.Tensor) and mask.dim() == 2 \
        and mask.shape[-1] == cache.get_seq_length() - P + ids.shape[-1] and cache.get_seq_length() >= P


class FastftPromptClassifier(ReloadKeepsEncoders, PeftModelForSequenceClassification):
    """peft's sequence-classification PeftModel (task_type SEQ_CLS), pooling each row's last real token. peft hands
    the virtual tokens and the row to the model as inputs_embeds, without input_ids, so a decoder's head
    (transformers' `score`, read at the rightmost token that is not pad_token_id) cannot see the padding: it read the
    last position, a padding token on a right-padded row (peft's logits there are another row's than the row alone).
    Here that position of the head's output carries the last real token's, found by transformers' rule on input_ids.
    Encoders' heads (`classifier`, on the first position's pooled output) are peft's as they are."""

    def forward(self, input_ids=None, *args, **kwargs):
        refuse_packed(self, kwargs)
        base = self.get_base_model()
        config, score = self.active_peft_config, getattr(base, "score", None)
        pad = base.config.get_text_config().pad_token_id
        if self._adapters_disabled or not isinstance(config, CONFIGS) or not isinstance(score, nn.Module) \
                or input_ids is None or pad is None:
            return super().forward(input_ids, *args, **kwargs)
        positions = torch.arange(input_ids.shape[-1], device=input_ids.device, dtype=torch.int32)
        last = (positions * (input_ids != pad).int()).argmax(-1) + config.num_virtual_tokens

        def pool_last_real(module, args, logits):  # (batch, P + length, classes): the last position is read
            picked = logits[torch.arange(logits.shape[0], device=logits.device), last.to(logits.device)]
            return torch.cat([logits[:, :-1], picked[:, None]], dim=1)

        handle = score.register_forward_hook(pool_last_real)
        try:
            return super().forward(input_ids, *args, **kwargs)
        finally:
            handle.remove()


def _exact_generation(model: PeftModel) -> PeftModel:
    """peft's PeftModel class for the task swapped for fastft's (same state): generation, pooling."""
    if type(model) is PeftModelForCausalLM:
        model.__class__ = FastftPromptModel
    elif type(model) is PeftModelForSequenceClassification:
        model.__class__ = FastftPromptClassifier
    return model


def get_prompt_model(model: nn.Module, config, adapter_name: str = "default", **kwargs):
    from fastft.integration.peft_lora import quiet_peft_model

    validate_prompt_config(config, model)
    return _exact_generation(quiet_peft_model(model, config, adapter_name, **kwargs))


def check_prompt_geometry(config, model: nn.Module, path) -> None:
    """A saved prompt-learning adapter (prompt tuning, P-tuning, prefix tuning) records the geometry of the model
    it was trained for: peft filled num_layers, token_dim and num_attention_heads from that model's config (for
    prefix tuning the key/value width and heads). Compared with what peft fills in for `model`: a mismatch is a
    ValueError naming the field (peft would drop a layer's prefix silently, or fail later in the forward)."""
    from peft.utils import _prepare_prompt_learning_config

    fields = ("num_layers", "num_attention_heads", "token_dim")
    fresh = copy.copy(config)
    for field in fields:
        setattr(fresh, field, None)
    try:
        _prepare_prompt_learning_config(fresh, model.config)
    except (ValueError, KeyError, AttributeError, TypeError):
        return  # peft cannot read this model's geometry either: it uses the saved one
    for field in fields:
        saved, want = getattr(config, field), getattr(fresh, field)
        if saved is not None and saved != want:
            raise ValueError(f"load_adapter: {path} holds a {type(config).__name__} with {field}={saved}, but "
                             f"{type(model).__name__} needs {field}={want}: the adapter was trained for a different "
                             "model; load it onto that model")


def load_prompt_adapter(model: nn.Module, path, config, adapter_name: str, is_trainable: bool):
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    validate_prompt_config(config, base)
    check_prompt_geometry(config, base, path)
    loaded = load_prompt_learning(model, path, adapter_name, is_trainable)
    return loaded if loaded is model else _exact_generation(loaded)


def load_prompt_learning(model: nn.Module, path, adapter_name: str, is_trainable: bool) -> PeftModel:
    """peft's load of a prompt-learning adapter (prompt, P-tuning, prefix), which peft refuses to make trainable:
    what was saved is the table of virtual-token embeddings (or prefix keys/values) the encoder produced, not a
    projection's MLP. Loaded as peft loads it, that table is the adapter; `is_trainable` trains the table itself
    (the same parameters peft's forward and save use), so a saved prefix or prompt can be trained further."""
    from fastft.integration.adapter_files import adapter_weights_file, read_weights
    from fastft.integration.peft_lora import quiet_peft_load

    read_weights(adapter_weights_file(Path(path)), shapes_only=True)  # missing or damaged: named, as for LoRA
    refuse_reload_into_an_encoder(model, path, adapter_name)
    was_training = model.training
    if isinstance(model, PeftModel):
        model.load_adapter(str(path), adapter_name=adapter_name)
        loaded = model
    else:
        loaded = quiet_peft_load(model, path, adapter_name=adapter_name)
    if is_trainable:
        loaded.prompt_encoder[adapter_name].requires_grad_(True)
        loaded.train(was_training)  # peft's inference load put the model in eval mode
    return loaded


def refuse_reload_into_an_encoder(model: nn.Module, path, adapter_name: str) -> None:
    """A reload into an adapter whose encoder makes the table (P-tuning; prefix tuning with prefix_projection) while
    training: the file holds the encoder's output, and peft puts it where the encoder's input goes (P-tuning: the
    same shape, silently; Trainer's resume_from_checkpoint then trained on 0.066 off the run's loss by step 4)."""
    if not isinstance(model, PeftModel) or adapter_name not in model.peft_config:
        return
    config = model.peft_config[adapter_name]
    encoder = isinstance(config, PromptEncoderConfig) or getattr(config, "prefix_projection", False)
    if encoder and not config.inference_mode:
        kind = "P-tuning" if isinstance(config, PromptEncoderConfig) else "prefix-projection"
        raise ValueError(f"load_adapter: {path} holds the virtual tokens' table that the {kind} encoder of adapter "
                         f"{adapter_name!r} made, not the encoder's weights: reloading it into that adapter would feed "
                         "the saved table through a fresh encoder again (peft's models do), so transformers.Trainer's "
                         "resume_from_checkpoint / load_best_model_at_end cannot restore it; load the table onto a "
                         "fresh base with fastft.load_adapter(base, path, is_trainable=True) and train that")


@contextlib.contextmanager
def whole_prompt_encoders(model: nn.Module, state_dict: dict | None):
    """peft saves a prompt-learning adapter (prompt, P-tuning, prefix) from its live prompt encoders and ignores
    save_pretrained's state_dict=; under FSDP2 their weights are this process's shards. Inside the block the
    whole weights from `state_dict` (gathered by the caller) stand in for the shards; no collective."""
    from torch.distributed.tensor import DTensor

    swapped = []
    if state_dict is not None:
        for adapter, encoder in (getattr(model, "prompt_encoder", None) or {}).items():
            for name, module in encoder.named_modules():
                for key, param in list(module._parameters.items()):
                    whole = state_dict.get(".".join(filter(None, ("prompt_encoder", adapter, name, key))))
                    if isinstance(param, DTensor) and whole is not None:
                        swapped.append((module, key, param))
                        module._parameters[key] = nn.Parameter(whole, requires_grad=False)
    try:
        yield
    finally:
        for module, key, param in swapped:
            module._parameters[key] = param
