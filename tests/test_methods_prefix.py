"""Prefix tuning: fastft's room feeds each layer's prefix to flash_attention's prefix_k/prefix_v (no
concatenated K/V; a KV cache holds the real tokens only) and matches peft's PrefixTuningConfig (its KV-cache path
on SDPA) in logits and gradients, with and without padding; save/load both ways with peft."""
import peft
import pytest
import torch
from peft import PrefixTuningConfig

import fastft
from fastft.integration.methods.prefix import FastftPrefixModel
from tests.methods_utils import (assert_generates_as_its_forward, assert_round_trips_with_peft, assert_same_step,
                                 copy_trainables, fastft_and_peft, ids, perturb_trainables, step)
from tests.utils import INTERPRET, assert_close, cache_kwarg, tiny_llama


def _config(**kw):
    return PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5, **kw)


def _pair(**kw):
    return fastft_and_peft(lambda: _config(**kw))


def _step_masked(model, batch, mask):
    """Loss only on kept tokens (padded query rows are free to differ between attention implementations)."""
    model.zero_grad(set_to_none=True)
    labels = batch.masked_fill(mask == 0, -100)
    labels[:, 1:] = labels[:, 1:].masked_fill(mask[:, :-1] == 0, -100)  # tokens predicted from a padded row
    out = model(input_ids=batch, attention_mask=mask, labels=labels)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.logits.detach()[mask.bool()], grads


@pytest.mark.parametrize("projection", [False, True])
def test_matches_peft_prefix_tuning(projection, monkeypatch):
    ours, theirs = _pair(prefix_projection=projection, encoder_hidden_size=24)
    assert isinstance(ours, FastftPrefixModel) and ours.get_base_model().config._attn_implementation == "fastft"
    calls = []
    import fastft.integration.attention as integration

    real = integration.flash_attention

    def spy(*args, **kwargs):
        calls.append(kwargs.get("prefix_k"))
        return real(*args, **kwargs)

    monkeypatch.setattr(integration, "flash_attention", spy)
    assert_same_step(step(ours, ids()), step(theirs, ids()), "prefix tuning")
    assert calls and all(p is not None and p.shape == (1, 5, 2, 16) for p in calls)  # the op got the prefix


def test_left_padded_batch_matches_peft():
    ours, theirs = _pair()
    batch, mask = ids(), torch.ones(2, 9, dtype=torch.long)
    mask[0, :3] = 0
    assert_same_step(_step_masked(ours, batch, mask), _step_masked(theirs, batch, mask), "padded prefix tuning")


@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_left_padded_batch_with_every_real_token_labelled_matches_peft(method):
    """HF's usual labels (only pads -100): a row's first real token is predicted from the padded position before it.
    Under SDPA (peft) that padded query sees the prefix / the virtual tokens before the padding; fastft attention
    gave it zeros, so loss and gradients differed (prefix tuning: loss 4.870 against 4.852). It is now computed as
    SDPA computes it: peft's loss, gradients and logits at every real token (other padded positions, which predict
    only -100 labels, stay zeros)."""
    config = (lambda: _config()) if method == "prefix" else (
        lambda: peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    ours, theirs = fastft_and_peft(config)
    if method == "prompt":  # fastft attention reaches prompt tuning through patch_model
        fastft.patch_model(ours)
    batch, mask = ids(), torch.ones(2, 9, dtype=torch.long)
    mask[0, :3] = 0
    got, want = (_step_hf_labels(m.train(), batch, mask) for m in (ours, theirs))
    assert_close(got[0], want[0], torch.float32, f"{method} loss")
    if not got[1].numel():  # the patched model's fused loss gives no logits: peft's at the real tokens stand in
        got = (got[0], want[1], got[2])
    assert_same_step(got[1:], want[1:], f"left-padded {method} tuning")


def _step_hf_labels(model, batch, mask):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=batch, attention_mask=mask, labels=batch.masked_fill(mask == 0, -100))
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    if out.logits is None:  # a patched model's fused loss in training mode: no logits
        return out.loss.detach(), torch.zeros(0), grads
    real = torch.cat([torch.zeros(2, out.logits.shape[1] - 9, dtype=torch.bool), mask.bool()], dim=1)
    return out.loss.detach(), out.logits.detach()[real], grads


@pytest.mark.skipif(not INTERPRET, reason="Triton attention on CPU needs the interpreter")
def test_triton_attention_kernels_with_prefix():
    from fastft.integration.attention import register_attention

    ours, theirs = _pair()
    register_attention("triton")
    try:
        got = step(ours, ids(batch=1, seq=7))
    finally:
        register_attention("auto")
    assert_same_step(got, step(theirs, ids(batch=1, seq=7)), "prefix tuning (Triton attention)")


def test_save_load_round_trips_with_peft(tmp_path):
    ours, _ = _pair()
    by_fastft = assert_round_trips_with_peft(ours, tmp_path)
    assert isinstance(by_fastft, FastftPrefixModel)


def test_generation_sees_the_prefix_as_training_does():
    """peft's cached generation drops the prefix under transformers 5 (the base model's tokens): fastft's generate
    feeds it to the attention op at every step."""
    ours, _ = _pair()
    perturb_trainables(ours, std=1.0)
    assert isinstance(ours, FastftPrefixModel)
    assert_generates_as_its_forward(ours)


@pytest.mark.parametrize("padded, backend", [(False, "auto"), (True, "auto"),
                                             pytest.param(False, "triton", marks=pytest.mark.skipif(
                                                 not INTERPRET, reason="Triton on CPU needs the interpreter"))])
def test_cached_forward_equals_the_whole_forward(padded, backend):
    """A manual decoding loop (use_cache, a cache) keeps the prefix at every step: the cache holds the real tokens,
    positions continue after them; the kernels align one query to the last key; a padded batch's decoding steps
    take the SDPA fallback, prefix in front."""
    from fastft.integration.attention import register_attention

    register_attention(backend)
    try:
        _check_cached_forward(padded)
    finally:
        register_attention("auto")


def _check_cached_forward(padded):
    ours, _ = _pair()
    perturb_trainables(ours, std=1.0)
    ours.eval()
    batch, mask = ids(), torch.ones(2, 9, dtype=torch.long)
    if padded:
        mask[1, :3] = 0
    pos = (mask.cumsum(1) - 1).clamp(min=0)  # positions counted from each row's first kept token
    with torch.no_grad():
        whole = ours(input_ids=batch, attention_mask=mask, position_ids=pos).logits
        out = ours(input_ids=batch[:, :5], attention_mask=mask[:, :5], position_ids=pos[:, :5], use_cache=True)
        parts, cache = [out.logits], out.past_key_values
        assert cache.get_seq_length() == 5  # real tokens only: the op adds the prefix
        for t in range(5, 9):
            out = ours(input_ids=batch[:, t:t + 1], attention_mask=mask[:, :t + 1], position_ids=pos[:, t:t + 1],
                       **cache_kwarg(cache), use_cache=True)
            parts.append(out.logits)
    cached = torch.cat(parts, 1)
    assert_close(cached[mask.bool()], whole[mask.bool()], torch.float32, "cached decoding with a prefix")


@pytest.mark.parametrize("cache_implementation", [None, "static"])
def test_generation_uses_a_cache(cache_implementation, monkeypatch):
    """generate decodes one token per forward (a KV cache of the real tokens), dynamic or static cache alike."""
    ours, _ = _pair()
    perturb_trainables(ours, std=1.0)
    ours.eval()
    import fastft.integration.attention as integration

    seen, real = [], integration.fastft_attention_forward

    def spy(module, query, key, *args, **kwargs):
        seen.append(query.shape[2])
        return real(module, query, key, *args, **kwargs)

    monkeypatch.setattr(integration, "fastft_attention_forward", spy)
    integration.register_attention()
    try:
        batch = ids(batch=1, seq=6)
        with torch.no_grad():
            out = ours.generate(input_ids=batch, max_new_tokens=3, do_sample=False,
                                cache_implementation=cache_implementation, output_scores=True,
                                return_dict_in_generate=True)
    finally:
        monkeypatch.undo()
        integration.register_attention()
    assert seen[-1] == 1 and seen[0] == 6  # prefill, then one query per step
    with torch.no_grad():
        seq = batch
        for t in range(3):
            logits = ours(input_ids=seq).logits[0, -1]
            assert torch.allclose(out.scores[t][0], logits, atol=1e-5), t
            seq = torch.cat([seq, logits.argmax()[None, None]], 1)


def test_bad_config_is_named():
    with pytest.raises(ValueError, match="PrefixTuningConfig.task_type='SEQ_CLS'"):
        fastft.get_peft_model(tiny_llama(), PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=5))


def test_gradient_checkpointing_keeps_the_prefix():
    """transformers' checkpointing re-runs each layer with the same keyword arguments: the prefix comes along."""
    ours, theirs = _pair()
    ours.train(), theirs.train()
    ours.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert_same_step(step(ours, ids()), step(theirs, ids()), "prefix tuning with checkpointing")


def _step_with_positions(model, batch, position_ids):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=batch, position_ids=position_ids, labels=batch)
    out.loss.backward()
    return out.logits.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_caller_position_ids_are_shifted_past_the_prefix_as_peft_does():
    """peft adds the prefix length to the caller's position_ids; packed documents (positions restarting at 0) then
    each match their own run."""
    ours, theirs = _pair()
    batch = ids()
    positions = torch.arange(9).expand(2, -1)
    assert_same_step(_step_with_positions(ours, batch, positions), _step_with_positions(theirs, batch, positions),
                     "prefix tuning with position_ids")
    docs = [ids(batch=1, seq=n, seed=s) for n, s in ((4, 1), (6, 2))]
    packed = torch.cat(docs, 1)
    restart = torch.cat([torch.arange(d.shape[1]) for d in docs])[None]
    with torch.no_grad():
        together = ours(input_ids=packed, position_ids=restart).logits[0]
        alone = torch.cat([ours(input_ids=d).logits[0] for d in docs])
    assert_close(together, alone, torch.float32, "packed documents vs each alone")


def test_a_sliding_window_smaller_than_prefix_plus_sequence_is_refused():
    """peft's prefix sits at cache positions 0..P-1, where the window hides it from far queries; fastft's op shows
    it to every query: exact (and equal to peft) while P + S <= window, refused beyond."""
    from transformers import MistralConfig, MistralForCausalLM

    def mistral():
        torch.manual_seed(0)
        return MistralForCausalLM(MistralConfig(vocab_size=128, hidden_size=64, intermediate_size=96,
                                                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                                head_dim=16, sliding_window=12, max_position_embeddings=64))

    ours = fastft.get_peft_model(mistral(), _config())
    theirs = peft.get_peft_model(mistral(), _config())
    perturb_trainables(ours)
    copy_trainables(ours, theirs)
    batch = ids(seq=7)  # 5 virtual tokens + 7 = the window
    assert_same_step(step(ours, batch), step(theirs, batch), "prefix tuning inside the window")
    with pytest.raises(ValueError, match="5 virtual tokens \\+ a 8-token sequence pass the window of 12"):
        ours(input_ids=ids(seq=8))
    # every row left-padded: the last row position, not the longest row (7 tokens), is how far peft's queries sit
    with pytest.raises(ValueError, match="5 virtual tokens \\+ a 8-token sequence pass the window of 12"):
        ours(input_ids=ids(seq=8), attention_mask=torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1, 1, 1]]))
    # decoding with a cache: refused at the step whose sequence passes the window (dense steps, and padded
    # steps through the SDPA fallback, counted from the positions)
    ours.eval()
    with torch.no_grad():
        ours.generate(input_ids=ids(batch=1, seq=6), max_new_tokens=2, do_sample=False)  # 5 + 7 keys: inside
        for mask in (None, torch.tensor([[0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])):
            batch = ids(batch=1 if mask is None else 2, seq=6)
            with pytest.raises(ValueError, match="a 8-token sequence pass the window of 12"):
                ours.generate(input_ids=batch, attention_mask=mask, max_new_tokens=3, do_sample=False)


def test_generation_keeps_the_prefix_after_the_attention_is_switched_away():
    """unpatch_model (or set_attn_implementation) puts back sdpa after get_peft_model chose fastft attention: peft's
    generate would then drop the prefix (the base model's tokens). generate runs through fastft attention for
    the call and leaves the setting as it found it."""
    ours = _pair()[0]
    perturb_trainables(ours, std=1.0)
    ours.eval()
    base = ours.get_base_model()
    batch = ids(batch=2, seq=6)
    with torch.no_grad():
        want = ours.generate(input_ids=batch, max_new_tokens=4, do_sample=False)
        base.set_attn_implementation("sdpa")
        got = ours.generate(input_ids=batch, max_new_tokens=4, do_sample=False)
        plain = base.generate(input_ids=batch, max_new_tokens=4, do_sample=False)
    assert not torch.equal(plain, want)  # the prefix changes these tokens
    assert torch.equal(got, want)
    assert base.config._attn_implementation == "sdpa"


def test_generation_from_inputs_embeds():
    """generate(inputs_embeds=...) (transformers reads the wrapped prepare_inputs_for_generation's signature)
    gives the tokens generate(input_ids=...) gives."""
    ours, _ = _pair()
    perturb_trainables(ours, std=1.0)
    ours.eval()
    batch = ids(batch=1, seq=6)
    with torch.no_grad():
        embeds = ours.get_base_model().get_input_embeddings()(batch)
        from_ids = ours.generate(input_ids=batch, max_new_tokens=3, do_sample=False)
        from_embeds = ours.generate(inputs_embeds=embeds, max_new_tokens=3, do_sample=False)
    assert torch.equal(from_embeds[0, -3:], from_ids[0, -3:])
