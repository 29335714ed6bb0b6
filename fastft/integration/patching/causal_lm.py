"""The causal-LM forward whose loss goes through fastft's fused lm_head cross-entropy.

With labels (or shift_labels), the head is never applied to the full sequence: the loss comes from the
final hidden states, `lm_head` and the shifted labels (fastft.ops.lm_head_cross_entropy, chunked over tokens),
and the output's `logits` is None. transformers' `num_items_in_batch` (gradient accumulation: the token count
of the whole accumulated batch) becomes the op's `num_items`, the mean's denominator, exactly as
transformers' ForCausalLMLoss divides its sum. Final logit softcapping (Gemma) is passed to the op.
Without labels the model's own forward runs unchanged (generation, evaluation of logits).
"""
from __future__ import annotations

import dataclasses
import inspect

import torch.nn.functional as F
from transformers.modeling_outputs import CausalLMOutputWithPast

from fastft.ops.linear_losses import lm_head_cross_entropy


# The cache field is `cache` in recent transformers, `past_key_values` before (the GPU machine runs an older one).
_CACHE_FIELD = "cache" if "cache" in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)} else "past_key_values"


def _output(loss, outputs):
    """CausalLMOutputWithPast without logits."""
    # read from the keys present: ModelOutput.get("past_key_values") logs a deprecation in recent transformers
    cache = next((outputs[k] for k in ("cache", "past_key_values") if k in outputs.keys()), None)
    return CausalLMOutputWithPast(loss=loss, logits=None, hidden_states=outputs.hidden_states,
                                  attentions=outputs.attentions, **{_CACHE_FIELD: cache})


class FusedLossCausalLMForward:
    _fastft_softcap_attr = None  # config attribute holding the final logit softcap, if the architecture has one
    _fastft_backend = "auto"  # patch_model's `backend`, for the fused loss as for the layer ops

    def forward(self, *args, labels=None, logits_to_keep=0, **kwargs):
        if args:  # positional arguments, named as the model's own forward names them
            names = [n for n in inspect.signature(super().forward).parameters][: len(args)]
            kwargs.update(zip(names, args))
            labels = kwargs.pop("labels", labels)
        shift_labels = kwargs.pop("shift_labels", None)
        if labels is None and shift_labels is None:
            return super().forward(logits_to_keep=logits_to_keep, **kwargs)
        if not (isinstance(logits_to_keep, int) and logits_to_keep == 0):
            raise ValueError("fastft.patch_model: with labels the loss covers every position; logits_to_keep must be 0 "
                             f"(got {logits_to_keep!r})")
        return_dict = kwargs.pop("return_dict", None)
        num_items = kwargs.pop("num_items_in_batch", None)
        ignore_index = kwargs.pop("ignore_index", -100)
        outputs = self.model(**kwargs)  # input_ids, masks, positions, cache, use_cache, attention kwargs: as given
        hidden = outputs.last_hidden_state
        if shift_labels is None:  # tokens < n predict n, as transformers' ForCausalLMLoss shifts
            shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
        softcap = getattr(self.config, self._fastft_softcap_attr, None) if self._fastft_softcap_attr else None
        loss = lm_head_cross_entropy(hidden, self.lm_head, shift_labels.to(hidden.device), ignore_index=ignore_index,
                                     reduction="mean", softcap=softcap, num_items=num_items,
                                     backend=self._fastft_backend)
        out = _output(loss, outputs)
        if return_dict is False:  # logits' place kept (None): `loss, logits = out[:2]` must not get the cache
            return (loss, None, *out.to_tuple()[1:])
        return out
