"""A --resume under DDP with 3 processes ends on the uninterrupted run's weights bit for bit (round 24).

torch's DDP lays its gradient buckets out again, once, after the first synced backward; where an element sits in
its bucket decides the order in which the all-reduce adds the processes' values, and over 3 processes (a + b) + c
and a + (b + c) round apart. The uninterrupted run summed step 3 in the relaid order, the run resumed from step 2
in the first guess's order: its adapter came out a few ulps apart (14 of 28 LoRA tensors in the round's sweep), where
2 processes (a + b = b + a, round 23) and FSDP2 were bit-identical. fastft train now lets DDP settle its buckets on a
zero-loss forward and backward before the first step (loop.settle_ddp_buckets)."""
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.train_utils import save_tiny_checkpoint

pytestmark = pytest.mark.slow  # a torchrun launch of 3 processes (~40 s on 2 CPU cores)

ROOT = Path(__file__).resolve().parent.parent


def test_three_process_ddp_resume_is_bit_identical(tmp_path):
    tiny = save_tiny_checkpoint(tmp_path / "tiny")
    rng = random.Random(3)
    words = "three processes sum gradients in buckets whose layout changes once after the first step".split()
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps({"text": " ".join(rng.choice(words) for _ in range(rng.randint(3, 30)))})
                            + "\n" for _ in range(24)))
    out = tmp_path / "run"
    argv = ["train", "--model", str(tiny), "--data", str(data), "--steps", "3", "--batch-size", "2",
            "--eval-examples", "2", "--max-length", "32", "--dropout", "0", "--lr", "3e-3", "--rank", "4",
            "--distributed", "ddp", "--save-every", "2", "--output-dir", str(out)]
    jobs = [{"argv": argv}, {"copy": [str(out), str(tmp_path / "straight")]},
            {"remove": str(out / "metrics.json")},  # as if killed after its step-2 checkpoint
            {"argv": argv + ["--resume"]}]
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "3",
                           str(ROOT / "tests" / "train_jobs_worker.py"), str(tmp_path / "jobs.json")],
                          cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    resumed = json.loads((out / "metrics.json").read_text())
    straight = json.loads((tmp_path / "straight" / "metrics.json").read_text())
    assert resumed["processes"] == 3 and resumed["resumed_from"].endswith("step-00000002")
    assert resumed["train_losses"] == straight["train_losses"] and resumed["eval_after"] == straight["eval_after"]
    a = load_file(str(tmp_path / "straight" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and a
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{len(differ)} of {len(a)} tensors differ, e.g. {differ[0]}"
