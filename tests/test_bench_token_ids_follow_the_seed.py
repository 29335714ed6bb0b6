"""The token ids a bench run trains on come from --seed (a generator seeded with it: the same ids for every row of
a table, other ids for another seed), as the model's weights do; here the model is a stand-in that records its
inputs, so only the token ids differ between the runs."""
from types import SimpleNamespace

import torch
from torch import nn

from fastft.apps.bench import peers, run
from fastft.apps.bench.config import BenchConfig

VOCAB = 50


class Recorder(nn.Module):
    def __init__(self):
        super().__init__()
        self.config = SimpleNamespace(vocab_size=VOCAB)
        self.embed = nn.Embedding(VOCAB, 4)
        self.seen = []

    def forward(self, input_ids, labels):
        self.seen.append(input_ids.clone())
        return SimpleNamespace(loss=self.embed(input_ids).square().mean())


def _ids(monkeypatch, seed):
    model = Recorder()
    monkeypatch.setattr(peers, "prepare", lambda *args, **kwargs: (model, {}))
    cfg = BenchConfig(shape="tiny", steps=2, warmup=1, seq_len=6, batch_size=2, seed=seed, methods=("lora",),
                      peers=())
    row = run.run_one(cfg, "lora", "fastft", torch.device("cpu"))
    assert row["status"] == "ok", row
    assert len(model.seen) == 3 and all(torch.equal(ids, model.seen[0]) for ids in model.seen)
    return model.seen[0]


def test_token_ids_are_drawn_from_the_seed(monkeypatch):
    for seed in (3, 4):
        expected = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(seed))
        assert torch.equal(_ids(monkeypatch, seed), expected), seed
    assert not torch.equal(_ids(monkeypatch, 3), _ids(monkeypatch, 4))
