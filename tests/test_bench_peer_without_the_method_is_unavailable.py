"""A peer that has no path for a method reads "unavailable" whether its package is installed or not: Unsloth × dora
read "not installed" (the package was looked for first) on a machine without Unsloth, as if installing it would
give a number."""
import torch

from fastft.apps.bench import peers, run
from fastft.apps.bench.config import BenchConfig


def test_unsloth_and_peft_without_the_method_are_unavailable():
    cfg = BenchConfig(shape="tiny", steps=1, warmup=1, seq_len=8, batch_size=1, methods=("dora",), peers=())
    for implementation, method in (("unsloth", "dora"), ("unsloth", "prefix"), ("peft", "adapter"),
                                   ("liger", "adapter")):
        row = run.run_one(cfg, method, implementation, torch.device("cpu"))
        assert row["status"] == "unavailable", row
        assert row["reason"] == peers.no_path(implementation, method)
    assert peers.no_path("unsloth", "qlora") is None and peers.no_path("peft", "dora") is None
