"""attn_implementation="fastft" on architectures outside the patching table (found by an architecture sweep over
transformers' causal-LM registry): each either matches its eager/sdpa twin or is refused, never silently wrong.

- BigBirdPegasus' and TrOCR's decoders take causality from transformers' full 4-D mask alone (transformers
  refuses SDPA and FlashAttention for them): the padding-only mask lost it. Refused.
- Doge always asks for a mask (allow_is_causal_skip=False) and builds its dynamic mask on it; Llama 4 asks for one
  for packed rows: models transformers refuses FlashAttention for get the full 4-D mask where one is asked for.
- GPT-BigCode (Persimmon, CTRL, Whisper's decoder...) pass no position_ids to their attention: packed rows without
  cu_seq_lens attended across documents. They now take the documents from transformers' packed-rows mask.
"""
from __future__ import annotations

import copy

import pytest
import torch

from fastft.integration.packing import PackingCollator

transformers = pytest.importorskip("transformers")


def _twins(config, reference="eager", auto=None):
    """(reference, fastft) models of `config` with the same weights, built by `auto` (AutoModelForCausalLM)."""
    from transformers import AutoModelForCausalLM

    import fastft

    fastft.register_attention()
    auto = auto or AutoModelForCausalLM
    torch.manual_seed(0)
    # a copy each: from_config keeps the config object, and the second build's attn_implementation would switch the
    # first model too (these tests compared fastft with itself)
    ref = auto.from_config(copy.deepcopy(config), attn_implementation=reference).eval()
    fast = auto.from_config(copy.deepcopy(config), attn_implementation="fastft").eval()
    fast.load_state_dict(ref.state_dict())
    assert ref.config._attn_implementation == reference and fast.config._attn_implementation == "fastft"
    return ref, fast


def _ids(n, seed=0):
    return torch.randint(3, 200, (1, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", ["bigbird_pegasus", "trocr"])
def test_decoders_that_need_the_full_mask_are_refused(kind):
    from transformers import BigBirdPegasusConfig, TrOCRConfig

    config = BigBirdPegasusConfig(vocab_size=256, d_model=32, decoder_layers=1, encoder_layers=1,
                                  decoder_attention_heads=4, encoder_attention_heads=4, decoder_ffn_dim=64,
                                  encoder_ffn_dim=64, is_decoder=True) if kind == "bigbird_pegasus" else \
        TrOCRConfig(vocab_size=256, d_model=32, decoder_layers=1, decoder_attention_heads=4, decoder_ffn_dim=64)
    _, fast = _twins(config)
    refused = ("supports neither SDPA nor FlashAttention.*causal mask would be lost|does not run its attention "
               "through.*without their causal or padding part")
    with torch.no_grad(), pytest.raises(ValueError, match=refused):
        fast(input_ids=_ids(8))


def test_doge_keeps_its_causal_mask():
    from transformers import DogeConfig

    config = DogeConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2)
    eager, fast = _twins(config)
    sdpa, _ = _twins(config, "sdpa")
    ids = _ids(12)
    later_changed = ids.clone()
    later_changed[0, 6:] = 7
    with torch.no_grad():
        out, ref, ref_sdpa = fast(input_ids=ids).logits, eager(input_ids=ids).logits, sdpa(input_ids=ids).logits
        torch.testing.assert_close(out, ref_sdpa, atol=2e-5, rtol=2e-5)  # what transformers' own sdpa runs
        if not torch.allclose(ref, ref_sdpa, atol=2e-5, rtol=2e-5):
            import transformers
            off = (ref - ref_sdpa).abs().max()
            pytest.skip(f"transformers {transformers.__version__}'s own Doge: its sdpa is {off:.2f} off its eager (its "
                        "sdpa mask is not causal there); fastft matches its sdpa")
        torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
        moved = (fast(input_ids=later_changed).logits[0, :6] - out[0, :6]).abs().max()
    assert moved == 0  # positions before the changed tokens do not see them


def _packed(docs, flash_kwargs):
    batch = PackingCollator(return_flash_kwargs=flash_kwargs)([{"input_ids": d} for d in docs])
    batch.pop("labels")
    return dict(batch, use_cache=False)  # transformers separates packed rows without a cache (training)


def _docs():
    g = torch.Generator().manual_seed(1)
    return [torch.randint(3, 200, (n,), generator=g).tolist() for n in (6, 5)]


def test_llama4_packed_rows_stay_apart():
    from transformers import Llama4TextConfig

    config = Llama4TextConfig(vocab_size=256, hidden_size=64, intermediate_size=128, intermediate_size_mlp=128,
                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                              num_local_experts=2, attention_chunk_size=64)
    sdpa, fast = _twins(config, "sdpa")
    docs = _docs()
    with torch.no_grad():
        alone = torch.cat([sdpa(input_ids=torch.tensor([d])).logits[0] for d in docs])
        packed = fast(**_packed(docs, flash_kwargs=False)).logits[0]
    torch.testing.assert_close(packed, alone, atol=2e-5, rtol=2e-5)


def _two_rows(batch):
    """The packed row twice (B = 2, each row packing the same documents)."""
    return {k: v.expand(2, -1) if k in ("input_ids", "position_ids") else v for k, v in batch.items()}


def test_packed_rows_whose_attention_gets_no_position_ids_run_apart():
    """GPT-BigCode's layers get no position_ids: packed rows attended across documents (as under transformers'
    FlashAttention-2), then were refused. The documents now come from the mask function transformers builds for
    packed rows (a query that does not see the key before it starts one): each matches the document run alone,
    in one row and in two, with or without the collator's cu_seq_lens."""
    from transformers import GPTBigCodeConfig

    config = GPTBigCodeConfig(vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=64)
    sdpa, fast = _twins(config, "sdpa")
    docs = _docs()
    with torch.no_grad():
        alone = torch.cat([sdpa(input_ids=torch.tensor([d])).logits[0] for d in docs])
        mixed = sdpa(input_ids=torch.tensor([docs[0] + docs[1]])).logits[0]
        assert (mixed - alone).abs().max() > 1e-2  # the second document differs when it sees the first
        packed = fast(**_packed(docs, flash_kwargs=False)).logits
        torch.testing.assert_close(packed[0], alone, atol=2e-5, rtol=2e-5)
        two = fast(**_two_rows(_packed(docs, flash_kwargs=False))).logits
        torch.testing.assert_close(two, torch.stack([alone, alone]), atol=2e-5, rtol=2e-5)
        torch.testing.assert_close(fast(**_packed(docs, flash_kwargs=True)).logits[0], alone, atol=2e-5, rtol=2e-5)
        # one document, and padded rows, are not packing: they run as before
        torch.testing.assert_close(fast(input_ids=torch.tensor([docs[0]])).logits, sdpa(
            input_ids=torch.tensor([docs[0]])).logits, atol=2e-5, rtol=2e-5)


def test_packed_rows_keep_their_documents_while_another_thread_runs_a_forward():
    """The mask function leaves each eager forward's documents for its attention calls: per thread, so a forward
    run in another thread between the mask and the attention (here: an unpacked batch, run in full while the
    packed forward waits at its first layer) does not hand the packed one its (absent) documents."""
    import threading

    from transformers import GPTBigCodeConfig

    config = GPTBigCodeConfig(vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=64)
    sdpa, fast = _twins(config, "sdpa")
    docs = _docs()
    other_done, results = threading.Event(), {}

    def wait_for_the_other(module, args):
        if threading.current_thread().name == "packed":
            assert other_done.wait(60)

    def packed():
        results["packed"] = fast(**_packed(docs, flash_kwargs=False)).logits[0]

    def other():
        results["other"] = fast(input_ids=torch.tensor([docs[1] + docs[0]])).logits[0]
        other_done.set()

    hook = fast.transformer.h[0].register_forward_pre_hook(wait_for_the_other)
    with torch.no_grad():
        threads = [threading.Thread(target=packed, name="packed"), threading.Thread(target=other, name="other")]
        threads[0].start()
        threads[1].start()
        for t in threads:
            t.join(120)
        hook.remove()
        alone = torch.cat([sdpa(input_ids=torch.tensor([d])).logits[0] for d in docs])
        whole = sdpa(input_ids=torch.tensor([docs[1] + docs[0]])).logits[0]
    torch.testing.assert_close(results["packed"], alone, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(results["other"], whole, atol=2e-5, rtol=2e-5)


def test_packed_rows_whose_attention_gets_no_position_ids_compiled():
    """Traced, transformers wraps every mask with position_ids in its packed-rows mask (it cannot read whether rows
    restart): compiled, GPT-BigCode's packed documents saw each other (2.4 off, silently; Persimmon, Fuyu, Moshi,
    Whisper, Dory too). One row's documents are now built in the graph from the mask function and run apart; over
    several rows (finding them would read values) such a batch stops the run in the graph. Unpacked rows with
    position_ids still run; the collator's cu_seq_lens still separate the documents; and a compiled attention
    under an eager mask (regional compilation) runs them apart as eagerly."""
    from transformers import GPTBigCodeConfig

    config = GPTBigCodeConfig(vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=64)
    sdpa, fast = _twins(config, "sdpa")
    docs = _docs()
    compiled = torch.compile(fast, backend="eager")
    with torch.no_grad():
        alone = torch.cat([sdpa(input_ids=torch.tensor([d])).logits[0] for d in docs])
        torch.testing.assert_close(compiled(**_packed(docs, flash_kwargs=False)).logits[0], alone, atol=2e-5,
                                   rtol=2e-5)
        with pytest.raises(RuntimeError, match="packs documents into several rows and GPTBigCodeAttention is not"):
            compiled(**_two_rows(_packed(docs, flash_kwargs=False)))
        torch.testing.assert_close(compiled(**_packed(docs, flash_kwargs=True)).logits[0], alone, atol=2e-5,
                                   rtol=2e-5)
        ids = torch.tensor([docs[0] + docs[1]]).expand(2, -1)
        positions = torch.arange(ids.shape[1])[None].expand(2, -1)
        torch.testing.assert_close(compiled(input_ids=ids, position_ids=positions, use_cache=False).logits,
                                   sdpa(input_ids=ids, position_ids=positions, use_cache=False).logits,
                                   atol=2e-5, rtol=2e-5)
        for block in fast.transformer.h:
            block.attn.compile(backend="eager")
        torch.testing.assert_close(fast(**_packed(docs, flash_kwargs=False)).logits[0], alone, atol=2e-5, rtol=2e-5)
    torch._dynamo.reset()


def _tiny_gemma3():
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3TextConfig, SiglipVisionConfig

    text = Gemma3TextConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=4,
                            layer_types=["full_attention", "sliding_attention"])
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                image_size=28, patch_size=14)
    config = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4, image_token_index=299)
    torch.manual_seed(0)
    state = Gemma3ForConditionalGeneration(config).state_dict()

    def build(impl):  # a config each (from_config keeps it: a later build would switch this model's attention)
        model = Gemma3ForConditionalGeneration._from_config(copy.deepcopy(config), attn_implementation=impl).eval()
        model.load_state_dict(state)
        assert model.config._attn_implementation == impl
        return model

    ids = _ids(12)
    image = torch.zeros_like(ids)
    image[0, 3:7] = 1  # four image tokens
    return build, ids, image


@pytest.mark.parametrize("compiled", [False, True])
def test_gemma3_image_tokens_keep_their_bidirectional_block(compiled):
    """Gemma 3's image tokens attend to each other both ways (transformers' blockwise overlay, composed without
    vmap): the full-attention layers dropped it under fastft (logits 0.33 off from eager from the image on). Traced
    by torch.compile, the eager probe (it reads a tensor) is skipped: the overlay was dropped again there."""
    import fastft

    fastft.register_attention()
    build, ids, image = _tiny_gemma3()
    out = {}
    for impl in ("eager", "fastft"):
        model = build(impl)
        run = torch.compile(model, backend="eager") if compiled and impl == "fastft" else model
        with torch.no_grad():
            out[impl] = run(input_ids=ids, token_type_ids=image).logits
    torch._dynamo.reset()
    torch.testing.assert_close(out["fastft"], out["eager"], atol=2e-5, rtol=2e-5)


def test_gemma3_image_overlay_under_compile_with_position_ids():
    """With position_ids and no padding mask, transformers wraps every traced mask in its packed-rows `and_masks`
    (it cannot read whether rows restart), which hid Gemma 3's image overlay from the traced check by name: the
    compiled model's logits were 0.59 off eager, silently. Now an in-graph probe stops that run with what to do,
    and the remedy it names (a 2-D mask of ones) matches eager."""
    import fastft

    fastft.register_attention()
    build, ids, image = _tiny_gemma3()
    positions = torch.arange(ids.shape[1])[None]
    with torch.no_grad():
        expected = build("eager")(input_ids=ids, token_type_ids=image, position_ids=positions).logits
        fast = torch.compile(build("fastft"), backend="eager")
        try:
            plain = fast(input_ids=ids, token_type_ids=image, position_ids=positions).logits
        except RuntimeError as e:
            assert "cannot tell from plain packed rows" in str(e)
        else:  # transformers 5.17 does not wrap the traced mask: the overlay is seen by name, and must be right
            torch.testing.assert_close(plain, expected, atol=2e-5, rtol=2e-5)
        got = fast(input_ids=ids, token_type_ids=image, position_ids=positions, attention_mask=torch.ones_like(ids))
        text_only = fast(input_ids=ids, token_type_ids=torch.zeros_like(ids), position_ids=positions).logits
        text_expected = build("eager")(input_ids=ids, token_type_ids=torch.zeros_like(ids), position_ids=positions)
    torch._dynamo.reset()
    torch.testing.assert_close(got.logits, expected, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(text_only, text_expected.logits, atol=2e-5, rtol=2e-5)


def test_an_encoders_mask_stays_unread():
    """Encoders' bidirectional masks always pass allow_is_causal_skip=False: the overlay probe took them for a causal
    mask it may not skip and gave a full 4-D mask (SDPA instead of the kernels, one device read a call)."""
    from transformers import LlamaConfig
    from transformers.masking_utils import bidirectional_mask_function

    from fastft.integration.attention import fastft_attention_mask

    config = LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4)
    kwargs = dict(mask_function=bidirectional_mask_function, allow_is_causal_skip=False,
                  allow_is_bidirectional_skip=True, dtype=torch.float32, config=config, use_vmap=False,
                  device=torch.device("cpu"))
    assert fastft_attention_mask(2, 8, 8, attention_mask=None, **kwargs) is None
    padded = torch.ones(2, 8, dtype=torch.bool)
    padded[0, :3] = False
    assert fastft_attention_mask(2, 8, 8, attention_mask=padded, **kwargs).shape == (2, 8)
