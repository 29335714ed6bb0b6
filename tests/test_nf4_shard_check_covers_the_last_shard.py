"""shard_problem (check_shardable) promises that FSDP2's dim-0 shards of an NF4 weight hold whole blocks, but it
looked at the first shard alone: a (9, 96) weight, blocksize 64, over 8 ranks passed (2-row shards, 192 values = 3
blocks) and then FSDP2's own step — the last shard (1 row, 96 values: 1.5 blocks) copied into the leading row of a
zero 2-row buffer — raised "cut through a quantization block" (fuzz-found, 2026-12-06). Now the last non-empty shard
is checked too, and for every shape and process count it passes, FSDP2's chunk / pad / copy steps go through."""
import itertools

import pytest
import torch

from fastft.quant import quantize_nf4
from fastft.quant.nf4_tensor_ops import check_shardable, shard_problem, shard_rows


def _fsdp2_shard_steps(w, world: int) -> None:
    """What FSDP2's FSDPParam does with dim-0 shards: torch.chunk, then each non-empty piece copied into the leading
    rows of a zero buffer of the largest piece's size (the all-gather's padded shard)."""
    rows = shard_rows(w.shape[0], world)
    for piece in torch.chunk(w, world, dim=0):
        padded = w.new_zeros((rows, *w.shape[1:]))
        padded.narrow(0, 0, piece.shape[0]).copy_(piece)
        assert torch.equal(padded.dequantize()[: piece.shape[0]], piece.dequantize())


def test_the_fuzzed_case_is_refused_naming_the_last_shard():
    w = quantize_nf4(torch.randn(9, 96), blocksize=64, double_quant=False)
    with pytest.raises(ValueError, match=r"q\.weight.*last shard of 1 rows holds 96 values.*blocksize 64"):
        check_shardable(w, 8, "q.weight")


@pytest.mark.parametrize("blocksize", [32, 64])
def test_what_the_check_passes_fsdp2_can_shard(blocksize):
    torch.manual_seed(0)
    passed = refused = 0
    for rows, cols, world in itertools.product([3, 8, 9, 13], [24, 40, 96], [2, 3, 5, 8]):
        w = quantize_nf4(torch.randn(rows, cols), blocksize=blocksize, double_quant=False)
        if shard_problem(w.shape, blocksize, world) is None:
            _fsdp2_shard_steps(w, world)
            passed += 1
        else:
            refused += 1
    assert passed and refused  # both sides of the rule exercised
