"""Prefix tuning: fastft's room feeds each layer's prefix to flash_attention's prefix_k/prefix_v (no
concatenated K/V, no cache object) and matches peft's PrefixTuningConfig (its KV-cache path on SDPA) in logits
and gradients, with and without padding; save/load both ways with peft."""
import pytest
import torch
from peft import PrefixTuningConfig

import fastft
from fastft.integration.methods.prefix import FastftPrefixModel
from tests.methods_utils import assert_round_trips_with_peft, assert_same_step, fastft_and_peft, ids, step
from tests.utils import INTERPRET, tiny_llama


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


def test_generation_takes_the_cache_path():
    ours, theirs = _pair()
    batch = ids(batch=1, seq=4)
    out = ours.generate(input_ids=batch, max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 7)
    assert torch.equal(out, theirs.generate(input_ids=batch, max_new_tokens=3, do_sample=False))


def test_bad_config_is_named():
    with pytest.raises(ValueError, match="PrefixTuningConfig.task_type='SEQ_CLS'"):
        fastft.get_peft_model(tiny_llama(), PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=5))


def test_gradient_checkpointing_keeps_the_prefix():
    """transformers' checkpointing re-runs each layer with the same keyword arguments: the prefix comes along."""
    ours, theirs = _pair()
    ours.train(), theirs.train()
    ours.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert_same_step(step(ours, ids()), step(theirs, ids()), "prefix tuning with checkpointing")
