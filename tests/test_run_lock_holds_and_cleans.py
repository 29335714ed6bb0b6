"""hold_output_dir: while the block runs, --output-dir is locked (a second holder, even in the same process, is
refused); on leaving, the lock is released (the next run of the same process, e.g. a notebook's second call of
fastft train's main, may take it). Entering, it removes what killed runs left: unfinished checkpoints, temporaries,
and puts back a folder save's previous version, of the merged model as of the adapter."""
import os
import socket
from types import SimpleNamespace

import pytest
import torch

from fastft.apps.training.config import ConfigError
from fastft.apps.training.run_lock import LOCK_NAME, _try_lock, clean_output_dir, hold_output_dir


def _accelerator():
    return SimpleNamespace(is_main_process=True, device=torch.device("cpu"), reduce=lambda t, op: t,
                           wait_for_everyone=lambda: None)


def test_the_lock_is_held_in_the_block_and_released_after_it(tmp_path):
    out = tmp_path / "run"
    with hold_output_dir(out, _accelerator()):
        assert (out / LOCK_NAME).is_file()
        lock, problem = _try_lock(out)
        assert lock is None and "is in use by another fastft train run" in problem
        with pytest.raises(ConfigError, match="is in use by another fastft train run"):
            with hold_output_dir(out, _accelerator()):
                pass
    for _ in range(2):  # released: taken again, by the same process too
        with hold_output_dir(out, _accelerator()):
            pass
    lock, problem = _try_lock(out)
    assert problem is None
    lock.close()


def test_entering_removes_what_a_killed_run_left(tmp_path):
    (tmp_path / "checkpoints" / ".step-00000004.tmp").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step-00000002").mkdir()
    (tmp_path / ".model.old").mkdir()
    (tmp_path / ".model.old" / "config.json").write_text("merged v1")
    with hold_output_dir(tmp_path, _accelerator()):
        assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-00000002"]
        assert (tmp_path / "model" / "config.json").read_text() == "merged v1"
        assert not (tmp_path / ".model.old").exists()


def test_a_merged_models_previous_version_is_put_back_or_dropped(tmp_path):
    (tmp_path / ".model.old").mkdir()
    (tmp_path / ".model.old" / "config.json").write_text("v1")
    clean_output_dir(tmp_path)  # killed between the two renames: the previous version goes back
    assert (tmp_path / "model" / "config.json").read_text() == "v1" and not (tmp_path / ".model.old").exists()
    (tmp_path / ".model.old").mkdir()
    (tmp_path / ".model.old" / "config.json").write_text("v0")
    clean_output_dir(tmp_path)  # both there: the new version made it, the old one goes
    assert (tmp_path / "model" / "config.json").read_text() == "v1" and not (tmp_path / ".model.old").exists()


def test_a_refusal_names_the_live_holder_not_an_earlier_one(tmp_path):
    tmp_path.joinpath(LOCK_NAME).write_text("process 1 on an-old-host\n")  # a killed run's holder line
    with hold_output_dir(tmp_path, _accelerator()):
        assert (tmp_path / LOCK_NAME).read_text() == f"process {os.getpid()} on {socket.gethostname()}\n"
        lock, problem = _try_lock(tmp_path)
        assert f"(process {os.getpid()} on " in problem and "an-old-host" not in problem
