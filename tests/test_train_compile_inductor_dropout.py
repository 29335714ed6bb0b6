"""`fastft train --compile default` with inductor and --dropout: inductor drew dropout's random numbers with its own
generator, so the masks of torch's F.dropout (LoRA on the torch path — the CPU's —, DoRA with dropout on every
backend, the model's own dropout) were not eager's: the losses drifted from the eager run's from step 2 (0.56%),
against the README's "a compiled run trains what the eager run trains", and resuming compiled <-> eager did not give
the same losses. The apps now have inductor take torch's generator (fallback_random) while the run lasts (it was
left set for the process after). DoRA with dropout draws
through F.dropout on every backend, as LoRA's torch path does (test_train_compile.py runs LoRA under inductor)."""
import json
import os
import shutil

import pytest
import torch
import torch._inductor.config

from fastft.apps.cli import main
from tests.train_utils import save_tiny_checkpoint


@pytest.mark.skipif(shutil.which(os.environ.get("CXX") or "g++") is None, reason="inductor on the CPU needs g++")
def test_inductor_compiled_dora_run_with_dropout_trains_the_eager_runs_losses(tmp_path):
    tiny = save_tiny_checkpoint(tmp_path / "tiny")
    data = tmp_path / "same.jsonl"  # documents of one token count: one packed shape, one compilation
    data.write_text("".join(json.dumps({"text": f"word{i % 7} and the other {i % 5} things go"}) + "\n"
                            for i in range(40)))
    common = ["train", "--model", str(tiny), "--data", str(data), "--batch-size", "2", "--eval-examples", "2",
              "--max-length", "24", "--lr", "3e-3", "--steps", "3", "--method", "dora", "--rank", "4",
              "--dropout", "0.2", "--seed", "1"]
    losses = {}
    for name, extra in (("eager", []), ("inductor", ["--compile", "default", "--compile-backend", "inductor"])):
        torch._dynamo.reset()
        with torch._inductor.config.patch(fallback_random=False):  # as a fresh process has it; restored after
            assert main([*common, "--output-dir", str(tmp_path / name), *extra]) == 0
            assert torch._inductor.config.fallback_random is False  # the run's setting did not outlive it
        metrics = json.loads((tmp_path / name / "metrics.json").read_text())
        losses[name] = metrics["train_losses"]
        if extra:
            assert metrics["compile"]["compiled"] and metrics["compile"]["graphs"] >= 1, metrics["compile"]
    torch.testing.assert_close(losses["inductor"], losses["eager"], rtol=1e-5, atol=0)
