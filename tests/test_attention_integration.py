"""attn_implementation="fastft" in transformers, and the packing collator.

A tiny random Llama checks every path of the attention function (plain, padded, packed from position_ids or
from the collator's cu_seq_lens, KV-cache decoding) against "sdpa"; the real SmolLM2 (slow) checks a full
forward and backward. On the CPU the kernels run through the interpreter (backend "triton").
"""
from __future__ import annotations

import pytest
import torch

from fastft.integration.packing import IGNORE_INDEX, PackingCollator
from tests.utils import assert_close, cache_kwarg, first_layers, interpreter_only

transformers = pytest.importorskip("transformers")


@pytest.fixture
def fastft_attention():
    import fastft

    on_gpu = torch.cuda.is_available()
    yield fastft.register_attention(backend="auto" if on_gpu else "triton")
    fastft.register_attention()


def tiny_llama(attn="fastft", **overrides):
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, head_dim=16, max_position_embeddings=256, pad_token_id=0)
    cfg.update(overrides)
    return AutoModelForCausalLM.from_config(LlamaConfig(**cfg), attn_implementation=attn)


def fwd_bwd(model, impl, batch):
    model.set_attn_implementation(impl)
    model.zero_grad(set_to_none=True)
    out = model(**batch, use_cache=False)
    out.loss.backward()
    return out, torch.cat([p.grad.reshape(-1) for p in model.parameters()])


def compare_to_sdpa(model, batch, valid=None, dtype=torch.float32):
    out, grads = fwd_bwd(model, "fastft", batch)
    ref, ref_grads = fwd_bwd(model, "sdpa", batch)
    keep = (lambda t: t[valid]) if valid is not None else (lambda t: t)
    assert_close(keep(out.logits.detach()), keep(ref.logits.detach()), dtype, "logits")
    assert_close(out.loss.detach(), ref.loss.detach(), dtype, "loss")
    assert_close(grads, ref_grads, dtype, "parameter gradients")


def test_registered_and_idempotent():
    import fastft
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    from fastft.integration.attention import fastft_attention_forward

    assert fastft.register_attention() == "fastft"
    assert fastft.register_attention() == "fastft"
    assert AttentionInterface._global_mapping["fastft"] is fastft_attention_forward
    assert "fastft" in AttentionMaskInterface._global_mapping
    with pytest.raises(ValueError, match="`backend` must be one of"):
        fastft.register_attention(backend="fast")


def _texts(lengths, vocab=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g) for n in lengths]


def _padded(seqs, left=False):
    S = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), S, dtype=torch.long)
    mask = torch.zeros(len(seqs), S, dtype=torch.long)
    for i, s in enumerate(seqs):
        sl = slice(S - len(s), S) if left else slice(0, len(s))
        ids[i, sl], mask[i, sl] = s, 1
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    return dict(input_ids=ids, attention_mask=mask, labels=labels), mask.bool()


@interpreter_only
@pytest.mark.parametrize("kind", ["plain", "padded_right", "padded_left", "packed_position_ids", "packed_collator"])
def test_tiny_llama_matches_sdpa(fastft_attention, kind):
    model = tiny_llama()
    seqs = _texts([13, 7, 20])
    if kind == "plain":
        ids = torch.stack([s[:7] for s in seqs])
        compare_to_sdpa(model, dict(input_ids=ids, labels=ids))
    elif kind.startswith("padded"):
        batch, valid = _padded(seqs, left=kind.endswith("left"))
        compare_to_sdpa(model, batch, valid)
    else:
        batch = PackingCollator(return_flash_kwargs=kind == "packed_collator")([{"input_ids": s} for s in seqs])
        compare_to_sdpa(model, batch)


@interpreter_only
@pytest.mark.parametrize("positions", [
    [[0, 1, 2, 3, 0, 1, 2, 0, 1, 2], [0, 1, 2, 3, 4, 5, 0, 1, 2, 3]],  # two packed rows
    [[3, 4, 5, 0, 1, 2, 3, 0, 1, 2]],  # a row starting mid-document (a continuation)
    [[0, 1, 2, 3, 10, 11, 12, 0, 1, 2]],  # a document restarting above the row's minimum
    [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14]],  # one run not from 0: one document
], ids=["two_rows", "continuation", "restart_above_min", "one_run"])
def test_documents_from_position_ids_as_transformers_separates_them(fastft_attention, positions):
    """Without cu_seq_lens or a mask, documents start at each row's first token and wherever the position does not
    rise by 1, in every row (transformers' find_packed_sequence_indices): sdpa's logits, loss and gradients."""
    pos = torch.tensor(positions)
    ids = torch.randint(3, 128, pos.shape, generator=torch.Generator().manual_seed(0))
    compare_to_sdpa(tiny_llama(), dict(input_ids=ids, position_ids=pos, labels=ids))


@interpreter_only
def test_non_causal_padded_queries_see_the_real_keys(fastft_attention):
    """Bidirectional attention (e.g. Gemma3's use_bidirectional_attention) on a padded batch: a padded query
    still attends to the row's real keys, as transformers' mask has it (not the zeros of dropped queries)."""
    import torch.nn.functional as F

    from fastft.integration.attention import fastft_attention_forward

    class Layer(torch.nn.Module):
        is_causal, layer_idx = False, 0

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, 7, 16, generator=g) for h in (4, 2, 2))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, :3] = 0
    got = fastft_attention_forward(Layer(), q, k, v, mask, scaling=0.25)[0]
    want = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                          attn_mask=mask[:, None, None, :].bool(), scale=0.25).transpose(1, 2)
    assert_close(got, want, torch.float32, "non-causal padded attention")


@interpreter_only
def test_padding_mask_is_read_once_per_forward(fastft_attention, monkeypatch):
    """Unpadding reads the mask on the host (a sync): once per forward for all layers, and the next forward's new
    mask read again (its logits, loss and gradients are sdpa's, not the first batch's)."""
    import fastft.integration.attention as integration

    reads = []
    real = integration._unpadding
    monkeypatch.setattr(integration, "_unpadding", lambda *a: reads.append(1) or real(*a))
    model = tiny_llama(num_hidden_layers=3)
    first, _ = _padded(_texts([13, 7, 20]), left=True)
    fwd_bwd(model, "fastft", first)
    assert len(reads) == 1, f"{len(reads)} host reads of the padding mask in one forward of 3 layers"
    second, valid = _padded(_texts([9, 16, 4], seed=2))
    compare_to_sdpa(model, second, valid)
    assert len(reads) == 2


@interpreter_only
def test_packed_equals_separate_sequences(fastft_attention):
    """No attention across documents: the packed row's logits equal each sequence run alone."""
    model = tiny_llama()
    seqs = _texts([5, 11, 8], seed=1)
    packed = model(**PackingCollator()([{"input_ids": s} for s in seqs]), use_cache=False).logits[0]
    alone = torch.cat([model(input_ids=s[None], use_cache=False).logits[0] for s in seqs])
    assert_close(packed.detach(), alone.detach(), torch.float32, "packed vs separate")


@interpreter_only
@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_generate_with_cache_matches_sdpa(fastft_attention, cache):
    """Decoding with a KV cache (one query, many keys: bottom-right causal), with and without padding; a static
    cache's key slots run past the filled positions (transformers' 4-D mask then, through SDPA)."""
    model = tiny_llama().eval()
    for seqs in ([_texts([9])[0]], _texts([9, 4], seed=2)):
        batch, _ = _padded(seqs, left=True)
        batch.pop("labels")
        scores = {}
        for impl in ("fastft", "sdpa"):
            model.set_attn_implementation(impl)
            gen = model.generate(**batch, max_new_tokens=4, do_sample=False, output_scores=True,
                                 return_dict_in_generate=True, pad_token_id=0, cache_implementation=cache)
            scores[impl] = torch.stack(gen.scores)
        assert_close(scores["fastft"], scores["sdpa"], torch.float32, f"generation scores, batch {len(seqs)}")


@interpreter_only
def test_peft_prefix_tuning_matches_sdpa(fastft_attention):
    """peft's prefix tuning hands the virtual tokens over as a KV cache: more keys than queries, bottom-right causal."""
    from peft import PrefixTuningConfig, get_peft_model

    model = get_peft_model(tiny_llama(), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5))
    ids = torch.randint(3, 128, (2, 11))
    results = {}
    for impl in ("fastft", "sdpa"):
        model.base_model.set_attn_implementation(impl)
        model.zero_grad(set_to_none=True)
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        grads = torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])
        results[impl] = (out.logits.detach(), grads)
    assert_close(results["fastft"][0], results["sdpa"][0], torch.float32, "logits")
    assert_close(results["fastft"][1], results["sdpa"][1], torch.float32, "prefix gradients")


def test_attention_dropout_is_refused(fastft_attention):
    model = tiny_llama(attention_dropout=0.1).train()
    with pytest.raises(ValueError, match="no attention dropout"):
        model(input_ids=torch.randint(3, 128, (1, 6)))


def test_t5_relative_position_bias_is_refused(fastft_attention):
    # T5 hands its relative position bias to the attention function: dropping it changed the logits silently
    from transformers import T5Config, T5ForConditionalGeneration
    config = T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_decoder_layers=1, num_heads=4,
                      decoder_start_token_id=0, pad_token_id=0, attn_implementation="fastft")
    # set in the config, not by set_attn_implementation: transformers 5.17 (the GPU machine's) left T5's encoder and
    # decoder, copies of the same config class, on sdpa that way
    model = T5ForConditionalGeneration(config).eval()
    with pytest.raises(ValueError, match="position_bias"):
        model(input_ids=torch.randint(1, 64, (1, 5)), labels=torch.randint(1, 64, (1, 3)))

def test_packing_collator_fields():
    feats = [{"input_ids": [5, 6, 7]}, {"input_ids": torch.tensor([8, 9]), "labels": [1, 2]}, {"input_ids": [4]}]
    batch = PackingCollator(pad_to_multiple_of=8, pad_token_id=0)(feats)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 4, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 0, 1]]
    assert batch["labels"].tolist() == [[-100, 6, 7, -100, 2, -100, -100, -100]]
    assert batch["cu_seq_lens_q"].dtype == torch.int32
    assert batch["cu_seq_lens_q"].tolist() == [0, 3, 5, 6, 8] == batch["cu_seq_lens_k"].tolist()
    assert batch["max_length_q"] == batch["max_length_k"] == 3
    plain = PackingCollator(return_flash_kwargs=False)(feats)
    assert set(plain) == {"input_ids", "labels", "position_ids"} and plain["input_ids"].shape == (1, 6)


@pytest.mark.parametrize("feats, pattern", [
    ([], "empty list"),
    ([{"labels": [1]}], "has no 'input_ids'"),
    ([{"input_ids": []}], "has no tokens"),
    ([{"input_ids": [1, 2], "labels": [1]}], "2 input_ids but 1 labels"),
])
def test_packing_collator_errors(feats, pattern):
    with pytest.raises(ValueError, match=pattern):
        PackingCollator()(feats)


# ----------------------------------------------------------------------------------------------
# The real SmolLM2 (Llama: 30 layers, 9 heads / 3 KV heads, head_dim 64)

@pytest.mark.slow
@interpreter_only
def test_smollm2_forward_backward_matches_sdpa(fastft_attention):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fastft.apps.models import smollm2_checkpoint

    path = smollm2_checkpoint()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="fastft", dtype=torch.float32)
    assert model.config._attn_implementation == "fastft"
    # One short sequence through the first 6 of the 30 layers (the real weights and head layout; the other layers
    # repeat the same shapes), forward and backward (dense causal GQA kernels). Every interpreted program costs
    # ~15 ms, so packed/padded batches are left to the tiny model above (each adds ~20 s here).
    first_layers(model)
    ids = torch.tensor([tok("The quick brown fox jumps over the lazy dog. Attention needs only the log-sum-exp.")
                        ["input_ids"]])
    compare_to_sdpa(model, dict(input_ids=ids, labels=ids))


# ----------------------------------------------------------------------------------------------
# GPU: the same model paths with the CUDA kernels in bf16, judged against fp32 SDPA: fastft's bf16 error may
# not exceed SDPA's own bf16 error by much.

@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["plain", "padded_right", "packed_collator"])
def test_gpu_tiny_llama_bf16(fastft_attention, monkeypatch, kind):
    import copy

    from tests.utils import rel_err

    monkeypatch.setenv("FASTFT_AUTOTUNE", "0")  # one compile per kernel, not one per config
    model32 = tiny_llama(hidden_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=64).cuda()
    model16 = copy.deepcopy(model32).to(torch.bfloat16)
    seqs = _texts([130, 77, 200])
    valid = None
    if kind == "plain":
        ids = torch.stack([s[:77] for s in seqs])
        batch = dict(input_ids=ids, labels=ids)
    elif kind == "padded_right":
        batch, valid = _padded(seqs)
        valid = valid.cuda()
    else:
        batch = PackingCollator()([{"input_ids": s} for s in seqs])
    batch = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
    keep = (lambda t: t[valid]) if valid is not None else (lambda t: t)
    ref, ref_grads = fwd_bwd(model32, "sdpa", batch)
    for what, ours, theirs in zip(("logits", "gradients"), fwd_bwd(model16, "fastft", batch),
                                  fwd_bwd(model16, "sdpa", batch)):
        if what == "logits":
            ours, theirs, want = keep(ours.logits.detach()), keep(theirs.logits.detach()), keep(ref.logits.detach())
        else:
            want = ref_grads
        ours_err, sdpa_err = rel_err(ours, want), rel_err(theirs, want)
        assert ours_err <= 1.5 * sdpa_err + 1e-3, \
            f"{kind} {what}: fastft bf16 error {ours_err:.2e}, sdpa {sdpa_err:.2e}"


@pytest.mark.parametrize("window", [None, 4])
def test_padded_decoding_fallback_keeps_causal_and_window(window):
    """Several new queries over a longer padded cache (SDPA fallback): the padding, bottom-right causal and the
    sliding window all apply, as in the reference on each row's unpadded keys."""
    from fastft.integration.attention import fastft_attention_forward
    from fastft.ops import attention_reference

    torch.manual_seed(0)
    B, H, KV, n_q, n_k, D = 2, 4, 2, 3, 10, 8
    q, k, v = torch.randn(B, H, n_q, D), torch.randn(B, KV, n_k, D), torch.randn(B, KV, n_k, D)
    pad = torch.tensor([0, 3])  # left padding of each row
    mask = torch.arange(n_k)[None, :] >= pad[:, None]

    class Attn(torch.nn.Module):
        is_causal, layer_idx = True, 0

    out, _ = fastft_attention_forward(Attn(), q, k, v, mask, scaling=D ** -0.5, sliding_window=window)
    for b in range(B):
        keep = slice(int(pad[b]), n_k)
        want = attention_reference(q[b:b + 1].transpose(1, 2), k[b:b + 1, :, keep].transpose(1, 2),
                                   v[b:b + 1, :, keep].transpose(1, 2), causal=True, window=window,
                                   softmax_scale=D ** -0.5)
        assert_close(out[b:b + 1], want, torch.float32, f"row {b}, window {window}")


def test_inference_mode_forward(fastft_attention):
    """position_ids made under torch.inference_mode have no version counter (the packing memo skips them)."""
    model = tiny_llama().eval()
    ids = torch.randint(3, 128, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(input_ids=ids).logits
    with torch.inference_mode():
        got = model(input_ids=ids).logits
    assert_close(got.clone(), want, torch.float32, "inference_mode forward")


# ------------------------------------------------------------------------- masks the packed kernels do not express

@interpreter_only
def test_padding_between_kept_tokens_under_a_window_matches_sdpa(fastft_attention):
    """prompt tuning's mask for a left-padded row (virtual tokens, pads, tokens) on a sliding-window model: packed,
    the window counted kept tokens, not row positions (Mistral's logits 57% off sdpa's after the gap)."""
    from transformers import AutoModelForCausalLM, MistralConfig

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(MistralConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=256, pad_token_id=0, sliding_window=6),
        attn_implementation="fastft")
    ids = torch.randint(3, 128, (2, 14), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 14, dtype=torch.long)
    mask[0, 3:7] = 0  # 3 kept, 4 pads, 7 kept
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    labels[:, 1:] = labels[:, 1:].masked_fill(mask[:, :-1] == 0, IGNORE_INDEX)  # nothing predicted from a pad
    compare_to_sdpa(model, dict(input_ids=ids, attention_mask=mask, labels=labels), mask.bool())


def test_mask_overlays_take_transformers_mask():
    """An or/and mask function (image tokens seeing each other both ways) reached the mask function and was
    dropped: plain causal. It now gets transformers' own 4-D mask, which the attention runs with SDPA."""
    from transformers.masking_utils import create_causal_mask

    config = tiny_llama().config
    block = lambda b, h, q, k: (q < 3) & (k < 3)  # noqa: E731 - tokens 0..2 see each other
    masks = {}
    for impl in ("sdpa", "fastft"):
        config._attn_implementation = impl
        masks[impl] = create_causal_mask(config=config, inputs_embeds=torch.zeros(1, 6, 64),
                                         attention_mask=torch.ones(1, 6, dtype=torch.long),
                                         **cache_kwarg(None, of=create_causal_mask),
                                         position_ids=torch.arange(6)[None], or_mask_function=block)
    assert masks["fastft"] is not None and torch.equal(masks["fastft"], masks["sdpa"])
    assert masks["fastft"][0, 0, 0, 2]  # token 0 sees token 2


def test_chunked_attention_is_refused_past_one_chunk():
    """Llama 4's chunked layers (attention_chunk_size) ran as full causal attention; exact within one chunk."""
    from types import SimpleNamespace

    from fastft.integration.attention import _check_not_chunked

    config = SimpleNamespace(attention_chunk_size=4, layer_types=["chunked_attention", "full_attention"])
    chunked, full = (SimpleNamespace(config=config, layer_idx=i) for i in (0, 1))
    _check_not_chunked(chunked, 4)
    _check_not_chunked(full, 12)
    with pytest.raises(ValueError, match="no chunked attention .attention_chunk_size=4, 12 keys"):
        _check_not_chunked(chunked, 12)


def test_output_attentions_warns_that_no_weights_come_back(fastft_attention):
    """It returned no weights without a word (transformers' sdpa warns)."""
    model = tiny_llama()
    ids = torch.randint(3, 128, (1, 5), generator=torch.Generator().manual_seed(0))
    with pytest.warns(UserWarning, match="returns no attention weights"):
        model(input_ids=ids, output_attentions=True)


def test_a_decoder_outside_the_attention_interface_is_refused(fastft_attention):
    """Bloom (and MPT) run their own attention but build their mask through transformers' mask interface, which
    for "fastft" returns a padding-only mask: the model lost causality (logits at position 0 moved 8.7 when token 5
    changed), with fastft's kernels never running. Refused at the first forward."""
    from transformers import AutoModelForCausalLM, BloomConfig

    config = BloomConfig(vocab_size=64, hidden_size=32, n_layer=1, n_head=4)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="fastft").eval()
    with pytest.raises(ValueError, match="BloomModel does not run its attention through transformers' attention"):
        model(torch.randint(0, 64, (1, 6)))
