"""attn_implementation="fastft" on encoders and encoder-decoders (found by a sweep over transformers' sequence-
classification and seq2seq registries, forward and gradients against the sdpa/eager twin): each matches its twin or
is refused, never silently wrong.

- T5Gemma's encoder passes its sliding_window unchanged to a bidirectional sliding layer whose mask sees keys up to
  sliding_window away (ModernBERT passes sliding_window + 1): the op's window reached one key short on each side.
- Pegasus-X builds its decoder's self-attention without is_causal=True: causality lived in the 4-D mask alone.
- T5Gemma 2 (no FlashAttention in transformers) concatenates its decoder's self- and cross-attention masks: the
  None / 2-D masks crashed it; its decoder's sub-config type maps to no model class.
"""
from __future__ import annotations

import pytest
import torch

from tests.test_attention_arch_coverage import _twins

transformers = pytest.importorskip("transformers")

# a tiny Gemma-style text stack, one sliding and one full layer (T5Gemma's and T5Gemma 2's sides)
_TEXT = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, sliding_window=4, layer_types=["sliding_attention", "full_attention"])


def _grads_and_logits(model, weights, run=None, **batch):
    """(logits, each parameter's gradient) of (logits * weights).sum(); `run`: the model compiled."""
    model.zero_grad()
    logits = (model if run is None else run)(**batch, use_cache=False).logits
    (logits * weights).sum().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _seq2seq_batch(n_in: int, n_out: int):
    """(encoder ids (2, n_in), decoder ids (2, n_out), weights of the logits)."""
    g = torch.Generator().manual_seed(0)
    return (torch.randint(3, 200, (2, n_in), generator=g), torch.randint(3, 200, (2, n_out), generator=g),
            torch.randn(2, n_out, 300, generator=g))


def _second_row_padded(ids, cut: int):
    mask = torch.ones_like(ids)
    mask[1, cut:] = 0
    return mask


def _assert_same(fast, ref, mask=None):
    (logits, grads), (expected, expected_grads) = fast, ref
    keep = (slice(None),) if mask is None else (mask.bool(),)
    torch.testing.assert_close(logits[keep], expected[keep], atol=2e-5, rtol=2e-5)
    assert grads.keys() == expected_grads.keys()
    for name, g in expected_grads.items():
        torch.testing.assert_close(grads[name], g, atol=2e-5 * (1 + float(g.abs().max())), rtol=1e-4, msg=name)


@pytest.mark.parametrize("compiled", [False, True])
def test_t5gemma_encoder_window_reaches_what_its_mask_draws(compiled):
    from transformers import AutoModelForSeq2SeqLM, T5GemmaConfig

    sub = dict(_TEXT, attn_logit_softcapping=None, dropout_rate=0.0, attention_dropout=0.0)
    config = T5GemmaConfig(encoder=dict(sub), decoder=dict(sub), vocab_size=300, pad_token_id=0)
    ref, fast = _twins(config, "eager", AutoModelForSeq2SeqLM)
    x, y, weights = _seq2seq_batch(12, 8)
    padded = _second_row_padded(x, 9)
    run = torch.compile(fast, backend="eager") if compiled else None
    for mask in (None, padded):
        _assert_same(_grads_and_logits(fast, weights, run, input_ids=x, attention_mask=mask, decoder_input_ids=y),
                     _grads_and_logits(ref, weights, input_ids=x, attention_mask=mask, decoder_input_ids=y))
    torch._dynamo.reset()


def test_modernbert_local_layers_keep_their_window():
    """ModernBERT passes sliding_window + 1: its mask's reach, which the window already had."""
    from transformers import AutoModelForMaskedLM, ModernBertConfig

    config = ModernBertConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                              num_attention_heads=4, local_attention=4, global_attn_every_n_layers=2,
                              pad_token_id=0, max_position_embeddings=64)
    ref, fast = _twins(config, "sdpa", AutoModelForMaskedLM)
    g = torch.Generator().manual_seed(1)
    x = torch.randint(3, 200, (2, 12), generator=g)
    weights = torch.randn(2, 12, 300, generator=g)
    _assert_same(_grads_and_logits(fast, weights, input_ids=x), _grads_and_logits(ref, weights, input_ids=x))


def test_pegasus_x_decoder_without_is_causal_is_refused():
    from transformers import AutoModelForSeq2SeqLM, PegasusXConfig

    config = PegasusXConfig(vocab_size=300, d_model=64, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
                            decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128,
                            max_position_embeddings=64, pad_token_id=0)
    _, fast = _twins(config, "eager", AutoModelForSeq2SeqLM)
    x = torch.randint(3, 200, (1, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), pytest.raises(ValueError, match="PegasusXAttention in the decoder is not marked causal"):
        fast(input_ids=x, decoder_input_ids=x[:, :6])


def test_t5gemma2_gets_the_masks_it_concatenates():
    from transformers import AutoModelForSeq2SeqLM, T5Gemma2Config

    text = _TEXT
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                  patch_size=14)
    config = T5Gemma2Config(encoder=dict(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                                         boi_token_index=296, eoi_token_index=297, image_token_index=298),
                            decoder=dict(text, pad_token_id=0), image_token_index=298, eoi_token_index=297)
    ref, fast = _twins(config, "sdpa", AutoModelForSeq2SeqLM)
    x, y, weights = _seq2seq_batch(10, 7)
    decoder_mask = _second_row_padded(y, 5)
    for mask in (None, decoder_mask):
        batch = dict(input_ids=x, decoder_input_ids=y, decoder_attention_mask=mask)
        _assert_same(_grads_and_logits(fast, weights, **batch), _grads_and_logits(ref, weights, **batch),
                     mask=decoder_mask if mask is not None else None)
