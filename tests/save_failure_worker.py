"""Run by tests/test_save_failures.py under torchrun (2 processes, gloo): a save that fails on one rank must raise
on every rank at once, not leave the others in a barrier until the process group's timeout. Each rank writes what
it saw to OUT/report-RANK.json."""
import json
import os
import sys
from pathlib import Path

import torch
from torch import nn


def error_of(call) -> str | None:
    try:
        call()
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    return None


def checkpoint_cases(out: Path, rank: int) -> dict:
    from accelerate import Accelerator

    from fastft.apps.training.checkpoints import Checkpoints

    acc = Accelerator(cpu=True)
    model = nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters())
    report = {}
    real_save = torch.save

    def rank1_disk_full(obj, f, *args, **kwargs):
        if rank == 1 and str(f).endswith("rng-1.pt"):
            raise OSError(28, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    torch.save = rank1_disk_full  # rank 1's own file fails: rank 0 wrote all of its part
    report["rank1_fails"] = error_of(lambda: Checkpoints(out / "a", acc).save(1, model, optimizer, {}))
    torch.save = real_save
    acc.wait_for_everyone()
    report["rank1_fails_left"] = sorted(p.name for p in (out / "a" / "checkpoints").iterdir())

    blocked = out / "b"  # rank 0 cannot make the checkpoints folder: a file is in its place
    if rank == 0:
        blocked.mkdir()
        (blocked / "checkpoints").write_text("not a folder")
    acc.wait_for_everyone()
    report["rank0_fails"] = error_of(lambda: Checkpoints(blocked, acc).save(1, model, optimizer, {}))

    report["then_saves"] = error_of(lambda: Checkpoints(out / "a", acc).save(2, model, optimizer, {}))
    report["then_left"] = sorted(p.name for p in (out / "a" / "checkpoints").iterdir())
    return report


def final_save_case(out: Path, rank: int, model_dir: str, data: str) -> dict:
    import fastft
    from fastft.apps.cli import main

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    fastft.save_adapter = disk_full  # only rank 0 writes the final adapter
    code = main(["train", "--model", model_dir, "--data", data, "--steps", "1", "--batch-size", "2",
                 "--eval-examples", "0", "--max-length", "24", "--output-dir", str(out / "run")])
    return {"final_save_exit": code}


if __name__ == "__main__":
    out, model_dir, data = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    rank = int(os.environ["RANK"])
    report = checkpoint_cases(out, rank)
    report.update(final_save_case(out, rank, model_dir, data))
    (out / f"report-{rank}.json").write_text(json.dumps(report))
