"""Prompt tuning and P-tuning: peft's own implementation through fastft's entry point (input-embedding
methods, nothing to fuse), checked against peft, with save/load both ways and config errors naming the field."""
import pytest
import torch
from peft import PromptEncoderConfig, PromptTuningConfig

import fastft
from tests.methods_utils import (assert_generates_as_its_forward, assert_round_trips_with_peft, assert_same_step,
                                 fastft_and_peft, ids, perturb_trainables, step)
from tests.utils import tiny_llama

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


@pytest.mark.parametrize("config, message", [
    (PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=4), r"PromptTuningConfig.task_type='SEQ_CLS'"),
    (PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=0), r"PromptTuningConfig.num_virtual_tokens=0"),
    (PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=-2, encoder_hidden_size=8),
     r"PromptEncoderConfig.num_virtual_tokens=-2"),
])
def test_bad_configs_are_named(config, message):
    with pytest.raises(ValueError, match=message):
        fastft.get_peft_model(tiny_llama(), config)
