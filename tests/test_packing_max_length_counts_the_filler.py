"""PackingCollator's max_length_q/k bound every document cu_seq_lens holds, the pad_to_multiple_of filler included:
the kernels size their grid by it (flash_attention checks it against the row only as n_docs · max >= tokens, the full
check needs FASTFT_DEBUG=1), so a filler longer than every real document would be left partly uncomputed."""
import pytest

from fastft.integration.packing import PackingCollator


@pytest.mark.parametrize("lengths, multiple", [([4, 1, 1, 1, 1], 16), ([3, 2], 8), ([5], 4), ([2, 2], 4)])
def test_max_length_is_the_longest_document_of_cu_seq_lens(lengths, multiple):
    feats = [{"input_ids": list(range(1, n + 1))} for n in lengths]
    batch = PackingCollator(pad_to_multiple_of=multiple)(feats)
    cu = batch["cu_seq_lens_q"]
    assert int(cu[-1]) == batch["input_ids"].shape[1]
    assert batch["max_length_q"] == batch["max_length_k"] == int(cu.diff().max())
