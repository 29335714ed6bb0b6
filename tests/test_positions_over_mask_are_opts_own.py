"""generation.positions_over_mask is OPT's own rule for positions it is not given (OPTLearnedPositionalEmbedding:
cumsum(mask) * mask - 1, padding at -1), with `before` kept tokens in front of the mask (a prefix, or virtual tokens)
counted first: checked against transformers' OPT embedding itself, its table reading back the position it looked up."""
import pytest
import torch
from transformers.models.opt.modeling_opt import OPTLearnedPositionalEmbedding

from fastft.integration.methods.generation import counts_positions_over_mask, positions_over_mask


def _opt_positions(mask, cache_length=0):
    table = OPTLearnedPositionalEmbedding(32, 1)
    with torch.no_grad():
        table.weight.copy_(torch.arange(table.weight.shape[0], dtype=torch.float32)[:, None])
    return table(mask, cache_length)[..., 0].long() - table.offset


MASKS = [
    torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1], [1, 1, 1, 0, 0]]),  # full, left- and right-padded rows
    torch.tensor([[0, 1, 0, 1, 1]]),
]


@pytest.mark.parametrize("mask", MASKS)
def test_positions_are_opts(mask):
    got = positions_over_mask(mask)
    assert got.dtype == torch.long
    assert torch.equal(got, _opt_positions(mask))
    assert got.min() == -1  # padding


@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("before", [1, 3])
def test_kept_tokens_before_the_mask_count_first(mask, before):
    full = torch.cat([torch.ones(mask.shape[0], before, dtype=mask.dtype), mask], 1)
    assert torch.equal(positions_over_mask(mask, before=before), _opt_positions(full)[:, before:])
    assert torch.equal(positions_over_mask(mask.bool(), before=before), positions_over_mask(mask, before=before))


def test_only_opt_counts_positions_over_its_mask():
    from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

    small = dict(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2)
    assert counts_positions_over_mask(OPTForCausalLM(OPTConfig(**small, ffn_dim=32, word_embed_proj_dim=16)))
    assert not counts_positions_over_mask(LlamaForCausalLM(LlamaConfig(**small, intermediate_size=32)))
