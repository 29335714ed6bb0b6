"""A bucketed row's padded target positions point at an ignored target (the last real token's row, whose shifted
label is a filler's first), even when the row's first document is trained from its first token: the sft loss of the
bucketed batch is the unpadded one's, and every padded target is IGNORE_INDEX."""
import torch

from fastft.apps.training.data import Example, pack
from fastft.apps.training.objectives import ObjectiveModel, hidden_at_targets
from tests.utils import tiny_llama

IGNORE = -100


def _docs(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    docs = [torch.randint(1, 128, (n,), generator=g).tolist() for n in lengths]
    return [Example(ids, list(ids)) for ids in docs]  # text documents: every token trained


def test_padded_targets_are_ignored_when_the_first_document_is_trained_throughout():
    items = _docs([20, 9, 14, 6])
    plain = pack(items, pad_token_id=0, flash_kwargs=False)
    padded = pack(items, pad_token_id=0, flash_kwargs=False, bucket=True)
    extra = padded["target_positions"].numel() - padded["num_targets"]
    assert extra > 0 and padded["num_targets"] == plain["num_targets"]
    flat = padded["labels"][:, 1:].flatten()
    assert (flat[padded["target_positions"][padded["num_targets"]:]] == IGNORE).all()
    model = tiny_llama()
    module = ObjectiveModel(model, "sft")
    with torch.no_grad():
        want, _ = module(plain)
        got, _ = module(padded)
        _, targets, _, _ = hidden_at_targets(model, padded)
    assert (targets[padded["num_targets"]:] == IGNORE).all()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
