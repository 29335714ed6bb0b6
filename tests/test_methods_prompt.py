"""Prompt tuning and P-tuning: peft's own implementation through fastft's entry point (input-embedding
methods, nothing to fuse), checked against peft, with save/load both ways and config errors naming the field."""
import peft
import pytest
import torch
from peft import PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig

import fastft
from tests.methods_utils import (assert_generates_as_its_forward, assert_round_trips_with_peft, assert_same_step,
                                 fastft_and_peft, ids, perturb_trainables, step)
from tests.utils import assert_close, rel_err, tiny_llama

CONFIGS = {
    "prompt": lambda: PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
    "p-tuning": lambda: PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, encoder_hidden_size=32),
}


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_matches_peft_and_round_trips(kind, tmp_path):
    ours, theirs = fastft_and_peft(CONFIGS[kind])
    assert_same_step(step(ours, ids()), step(theirs, ids()), kind)
    assert_round_trips_with_peft(ours, tmp_path, kind)


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_generation_sees_the_virtual_tokens_as_training_does(kind, tmp_path):
    """peft's cached generation is off after the first new token under transformers 5; fastft's is exact, also
    for an adapter loaded back. (Not on left-padded rows: peft puts the virtual tokens before the padding and
    ignores position_ids, in its forward as in generation.)"""
    ours, _ = fastft_and_peft(CONFIGS[kind])
    perturb_trainables(ours, std=1.0)
    assert_generates_as_its_forward(ours, left_padded=False)
    ours.save_pretrained(str(tmp_path))
    assert_generates_as_its_forward(fastft.load_adapter(tiny_llama(), tmp_path), left_padded=False)


@pytest.mark.parametrize("kind, cache_implementation", [("prompt", None), ("p-tuning", None), ("prompt", "static")])
def test_generation_is_cached_and_matches_padded_forwards(kind, cache_implementation, monkeypatch):
    """One query per decoding step (the virtual tokens stay in the KV cache; a static cache, sized without them,
    recomputes instead), and a left-padded row scores as peft's forward on that padded row: virtual tokens in
    front of the padding, positions counted over all."""
    import transformers.models.llama.modeling_llama as llama

    ours, _ = fastft_and_peft(CONFIGS[kind])
    perturb_trainables(ours, std=1.0)
    ours.eval()
    queries, sdpa = [], llama.ALL_ATTENTION_FUNCTIONS["sdpa"]

    def spy(module, query, *args, **kwargs):
        queries.append(query.shape[2])
        return sdpa(module, query, *args, **kwargs)

    monkeypatch.setitem(llama.ALL_ATTENTION_FUNCTIONS, "sdpa", spy)
    batch, mask = ids(batch=2, seq=6), torch.ones(2, 6, dtype=torch.long)
    mask[1, :2] = 0
    with torch.no_grad():
        out = ours.generate(input_ids=batch, attention_mask=mask, max_new_tokens=3, do_sample=False,
                            output_scores=True, return_dict_in_generate=True, cache_implementation=cache_implementation)
    assert queries[0] == 4 + 6 and queries[-1] == (1 if cache_implementation is None else 4 + 8)
    with torch.no_grad():
        for row in range(2):
            seq, seen = batch[row:row + 1], mask[row:row + 1]
            for t in range(3):
                logits = ours(input_ids=seq, attention_mask=seen).logits[0, -1]
                assert torch.allclose(out.scores[t][row], logits, atol=1e-5), (row, t)
                seq, seen = torch.cat([seq, logits.argmax()[None, None]], 1), torch.cat([seen, seen[:, :1] * 0 + 1], 1)
            assert torch.equal(out.sequences[row, 6:], seq[0, -3:]), row


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_generation_with_a_passed_cache_gives_the_one_call_tokens(kind):
    """A passed empty DynamicCache fills as the default one does; a cache from an earlier call (transformers'
    continue-generation pattern: it counts the virtual tokens) is left out and the sequence recomputed. Both were
    appended to at every step and gave other tokens."""
    from transformers import DynamicCache

    ours, _ = fastft_and_peft(CONFIGS[kind])
    perturb_trainables(ours, std=1.0)
    ours.eval()
    batch = ids(batch=2, seq=7)
    with torch.no_grad():
        want = ours.generate(input_ids=batch, max_new_tokens=6, do_sample=False)
        empty = DynamicCache()
        assert torch.equal(ours.generate(input_ids=batch, max_new_tokens=6, do_sample=False,
                                         past_key_values=empty), want)
        assert empty.get_seq_length() == 4 + 7 + 5  # used: the virtual tokens, the prompt, all but the last token
        first = ours.generate(input_ids=batch, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
        cache = first.past_key_values
        length = cache.get_seq_length()
        again = ours.generate(input_ids=first.sequences, max_new_tokens=3, do_sample=False, past_key_values=cache)
    assert torch.equal(again, want)
    assert cache.get_seq_length() == length  # left untouched


@pytest.mark.parametrize("config, message", [
    (PromptTuningConfig(task_type="TOKEN_CLS", num_virtual_tokens=4), r"PromptTuningConfig.task_type='TOKEN_CLS'"),
    (PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=0), r"PromptTuningConfig.num_virtual_tokens=0"),
    (PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=-2, encoder_hidden_size=8),
     r"PromptEncoderConfig.num_virtual_tokens=-2"),
])
def test_bad_configs_are_named(config, message):
    with pytest.raises(ValueError, match=message):
        fastft.get_peft_model(tiny_llama(), config)


TRAINABLE_LOADS = {**CONFIGS,
                   "prefix": lambda: PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
                   "prefix-projection": lambda: PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4,
                                                                   prefix_projection=True, encoder_hidden_size=24)}


@pytest.mark.parametrize("kind", sorted(TRAINABLE_LOADS))
def test_saved_adapter_loads_trainable_and_trains_on(kind, tmp_path):
    """peft refuses is_trainable=True for prompt learning; fastft trains the saved table (what a projection or
    P-tuning's encoder produced): the saved logits, the gradients of peft's own load with that table unfrozen,
    and a trained step that peft loads back."""
    ours, _ = fastft_and_peft(TRAINABLE_LOADS[kind])
    batch = ids()
    with torch.no_grad():
        saved_logits = ours(input_ids=batch).logits
    fastft.save_adapter(ours, tmp_path / "saved")
    loaded = fastft.load_adapter(tiny_llama().train(), tmp_path / "saved", is_trainable=True)
    assert loaded.training, "the model is left in the mode it came in (peft's load for inference sets eval)"
    assert [n for n, p in loaded.named_parameters() if p.requires_grad] == ["prompt_encoder.default.embedding.weight"]
    reference = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "saved"))
    reference.prompt_encoder["default"].requires_grad_(True)
    logits, grads = step(loaded, batch)
    assert_close(logits, saved_logits, torch.float32, f"{kind}: loaded trainable")
    assert_same_step((logits, grads), step(reference, batch), kind)

    torch.optim.SGD([p for p in loaded.parameters() if p.requires_grad], lr=1.0).step()
    with torch.no_grad():
        trained_logits = loaded(input_ids=batch).logits
    assert rel_err(trained_logits, saved_logits) > 1e-3, f"{kind}: the step changed nothing"
    fastft.save_adapter(loaded, tmp_path / "trained")
    back = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "trained"))
    with torch.no_grad():
        assert_close(back(input_ids=batch).logits, trained_logits, torch.float32, f"{kind}: trained, saved, loaded")
