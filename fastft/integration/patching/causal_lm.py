"""The causal-LM forward whose loss goes through fastft's fused lm_head cross-entropy.

In training mode with labels (or shift_labels), the head is never applied to the full sequence: the loss comes
from the final hidden states, `lm_head` and the shifted labels (fastft.ops.lm_head_cross_entropy, chunked over
tokens), and the output's `logits` is None. transformers' `num_items_in_batch` (gradient accumulation: the token
count of the whole accumulated batch) becomes the op's `num_items`, the mean's denominator, exactly as
transformers' ForCausalLMLoss divides its sum. Final logit softcapping (Gemma) is passed to the op; logits scaling
(Granite's logits = lm_head(h) / s) divides the hidden states instead (the same logits for a head without a bias;
a head with one keeps the model's own loss). A MoE model (Mixtral, Qwen3-MoE) with output_router_logits gets its
router's load-balancing loss added, × router_aux_loss_coef, and `aux_loss` / `router_logits` in its output, as
its own head does.

Not in training mode (model.eval(): transformers.Trainer's evaluate / predict, whose metrics read the logits), the
model's own forward runs with the labels: logits and loss as the unpatched model gives them, as Liger-Kernel's
patched forwards do. `skip_logits=True` / `False` overrides that choice for one call (e.g. a fused loss in eval
mode, where the logits would not fit). Without labels the model's own forward runs unchanged (generation).
An lm_head the fused loss does not take (DoRA on lm_head, lora_bias, ...: fastft.ops.lm_head.head_of_module) keeps
the model's own loss too, with one warning per model.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import sys
import warnings

import torch
import torch.nn.functional as F
from transformers.modeling_outputs import CausalLMOutputWithPast, MoeCausalLMOutputWithPast

from fastft.ops.linear_losses import lm_head_cross_entropy
from fastft.ops.lm_head import head_of_module


# Each output class's fields, read once (dataclasses.fields breaks a torch.compile graph). The cache field is
# `cache` in recent transformers, `past_key_values` before (the GPU machine runs an older one).
_FIELDS = {cls: tuple(f.name for f in dataclasses.fields(cls))
           for cls in (CausalLMOutputWithPast, MoeCausalLMOutputWithPast)}
_CACHE_FIELD = {cls: "cache" if "cache" in names else "past_key_values" for cls, names in _FIELDS.items()}


def _counted(num_items):
    """transformers' num_items_in_batch as the fused loss's denominator. Trainer counts 0 for an accumulated batch
    whose labels are all ignored; every label of this batch is ignored then, so its loss is 0 over any denominator
    (transformers' own mean gives NaN there, which Trainer's logging filter hides): 1 instead, not the op's refusal
    (a tensor is clamped on the device, with no read)."""
    if isinstance(num_items, torch.Tensor):
        return num_items.clamp(min=1)
    return None if num_items == 0 else num_items


def _output(loss, outputs, **moe):
    """The model's output without logits: CausalLMOutputWithPast, or MoeCausalLMOutputWithPast given `moe`
    (aux_loss, router_logits)."""
    # read from the keys present: ModelOutput.get("past_key_values") logs a deprecation in recent transformers
    cache = next((outputs[k] for k in ("cache", "past_key_values") if k in outputs.keys()), None)
    cls = MoeCausalLMOutputWithPast if moe else CausalLMOutputWithPast
    return cls(loss=loss, logits=None, hidden_states=outputs.hidden_states, attentions=outputs.attentions,
               **{_CACHE_FIELD[cls]: cache}, **moe)


def _as_tuple(out) -> tuple:
    """out.to_tuple() with logits' place kept (None), as in the unpatched tuple: `loss, logits = out[:2]` (or
    `loss, aux_loss, logits = out[:3]`) must not get the cache."""
    return tuple(getattr(out, name) for name in _FIELDS[type(out)]
                 if name == "logits" or getattr(out, name) is not None)


def _has_bias(head) -> bool:
    return any(getattr(m, "bias", None) is not None for m in head.modules())


def _fused_head(model) -> bool:
    """Whether the fused loss takes model.lm_head (checked each call: adapters may change after patching); a
    refused head is said once per model, with why."""
    try:
        head_of_module("lm_head_cross_entropy", model.lm_head, check_only=True)
        if model._fastft_logits_scaling_attr is not None and _has_bias(model.lm_head):
            raise ValueError("logits scaling divides the hidden states, which would scale the head's bias too")
    except (TypeError, ValueError) as why:  # a module type or an adapter option the fused loss does not take
        if not model.__dict__.get("_fastft_warned_unfused"):
            model.__dict__["_fastft_warned_unfused"] = True
            warnings.warn(f"fastft.patch_model: {type(model).__name__} computes its loss unfused (the model's own "
                          f"forward, with the full tokens x vocab logits): {why}", stacklevel=3)
        return False
    return True


class FusedLossCausalLMForward:
    # set per architecture by patch_model, from its table (fastft.integration.patching.table.Architecture)
    _fastft_softcap_attr = None  # config attribute holding the final logit softcap, if the architecture has one
    _fastft_logits_scaling_attr = None  # config attribute: logits = lm_head(h) / scaling
    _fastft_router_aux_loss = None  # MoE: name of the modeling module's load-balancing function
    _fastft_backend = "auto"  # patch_model's `backend`, for the fused loss as for the layer ops

    def forward(self, *args, labels=None, logits_to_keep=0, skip_logits=None, **kwargs):
        """The model's forward, its loss through fastft's fused lm_head cross-entropy in training mode (logits None);
        skip_logits=True / False: fused or the model's own head and loss, whatever the mode."""
        if args:  # positional arguments, named as the model's own forward names them
            names = [n for n in inspect.signature(super().forward).parameters][: len(args)]
            kwargs.update(zip(names, args))
            labels = kwargs.pop("labels", labels)
        has_labels = labels is not None or kwargs.get("shift_labels") is not None
        if skip_logits and not has_labels:
            raise ValueError("fastft.patch_model: skip_logits=True needs labels (or shift_labels): without them there "
                             "is no loss to compute instead of the logits")
        fused = has_labels and (self.training if skip_logits is None else skip_logits) and _fused_head(self)
        if not fused:
            if labels is None and has_labels:
                # shift_labels alone: transformers' ForCausalLMLoss reads them and ignores `labels`, but the model's
                # forward computes a loss only when `labels` is given
                labels = kwargs["shift_labels"]
            return super().forward(labels=labels, logits_to_keep=logits_to_keep, **kwargs)
        if not (isinstance(logits_to_keep, int) and logits_to_keep == 0):
            raise ValueError("fastft.patch_model: with labels the loss covers every position; logits_to_keep must be 0 "
                             f"(got {logits_to_keep!r})")
        shift_labels = kwargs.pop("shift_labels", None)
        return_dict = kwargs.pop("return_dict", None)
        num_items = _counted(kwargs.pop("num_items_in_batch", None))
        ignore_index = kwargs.pop("ignore_index", -100)
        moe = self._fastft_router_aux_loss is not None
        if moe:  # None: the config's, as the model's own forward resolves it
            routed = kwargs.get("output_router_logits")
            routed = kwargs["output_router_logits"] = self.config.output_router_logits if routed is None else routed
        outputs = self.model(**kwargs)  # input_ids, masks, positions, cache, use_cache, attention kwargs: as given
        hidden = outputs.last_hidden_state
        if self._fastft_logits_scaling_attr is not None:  # lm_head(h) / s = lm_head(h / s): no bias (_fused_head)
            hidden = hidden / getattr(self.config, self._fastft_logits_scaling_attr)
        if shift_labels is None:  # tokens < n predict n, as transformers' ForCausalLMLoss shifts
            shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
        softcap = getattr(self.config, self._fastft_softcap_attr, None) if self._fastft_softcap_attr else None
        loss = lm_head_cross_entropy(hidden, self.lm_head, shift_labels.to(hidden.device), ignore_index=ignore_index,
                                     reduction="mean", softcap=softcap, num_items=num_items,
                                     backend=self._fastft_backend)
        if not moe:
            out = _output(loss, outputs)
        else:
            aux_loss = None
            if routed:  # the call transformers' MoE heads make
                load_balancing = getattr(sys.modules[type(self).__module__], self._fastft_router_aux_loss)
                aux_loss = load_balancing(outputs.router_logits, self.num_experts, self.num_experts_per_tok,
                                          kwargs.get("attention_mask"))
                loss = loss + self.router_aux_loss_coef * aux_loss.to(loss.device)
            out = _output(loss, outputs, aux_loss=aux_loss, router_logits=outputs.router_logits)
        return _as_tuple(out) if return_dict is False else out


@functools.lru_cache(maxsize=None)
def forward_with_signature(cls: type):
    """FusedLossCausalLMForward.forward under cls.forward's signature (plus `skip_logits`): transformers.Trainer
    reads the model's forward signature to drop the dataset columns it does not take (remove_unused_columns, on
    by default), and `(*args, labels, **kwargs)` would have lost input_ids and attention_mask."""
    def forward(self, *args, **kwargs):
        return FusedLossCausalLMForward.forward(self, *args, **kwargs)

    signature = inspect.signature(cls.forward)
    params = list(signature.parameters.values())
    if "skip_logits" not in signature.parameters:
        at = next((i for i, p in enumerate(params) if p.kind is p.VAR_KEYWORD), len(params))
        params.insert(at, inspect.Parameter("skip_logits", inspect.Parameter.KEYWORD_ONLY, default=None))
    forward.__signature__ = signature.replace(parameters=params)
    forward.__qualname__ = f"{cls.__qualname__}.forward"
    forward.__doc__ = FusedLossCausalLMForward.forward.__doc__
    return forward
