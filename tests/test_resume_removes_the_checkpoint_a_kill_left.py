"""A run killed between publishing a checkpoint and removing the previous one left that one (whole, or half
removed); only a later save removed it, so when the run resumed past its last save (--save-every not dividing
--steps) it stayed for good beside the newest. The resumed run removes it once the newest is loaded."""
import shutil

import pytest

from fastft.apps.cli import main
from tests import train_utils

tiny, one_thread = train_utils.tiny, train_utils.one_thread  # the shared fixtures

pytestmark = pytest.mark.slow  # runs training jobs


def test_a_resumed_run_keeps_only_the_checkpoint_it_resumed_from(tiny, tmp_path, one_thread):
    out = tmp_path / "run"
    argv = ["train", "--model", str(tiny), "--steps", "3", "--batch-size", "2", "--eval-examples", "0",
            "--max-length", "16", "--save-every", "2", "--output-dir", str(out)]
    assert main(argv) == 0
    checkpoints = out / "checkpoints"
    newest = checkpoints / "step-00000002"
    older = checkpoints / "step-00000001"
    shutil.copytree(newest, older)  # the killed run's previous checkpoint, half removed
    for name in ("optimizer.pt", "rng-0.pt"):
        (older / name).unlink()
    (out / "metrics.json").unlink()  # killed after its step-2 checkpoint: not finished
    assert main([*argv, "--resume"]) == 0
    assert [p.name for p in checkpoints.iterdir()] == [newest.name]
