"""One run per --output-dir: an exclusive lock held for the run's lifetime, and the cleanup it makes safe.

The lock is an `fcntl.flock` on OUTPUT_DIR/.fastft-train.lock, taken without waiting by the main process: a second
run (a requeued job while the first is still alive, the same command started twice) fails at once instead of deleting
the first run's checkpoint in progress and interleaving its logs. The kernel drops the lock when the holder's process
ends, however it ends (SIGKILL, OOM killer), so a killed run's --resume is never blocked by it; the file stays, empty
of meaning until locked again. NFS clients emulate flock with byte-range locks, which the server arbitrates.

Holding the lock, the run removes what killed runs left in the folder (temporary files and folders of fastft's naming,
a checkpoint save's `.step-*.tmp`, a folder save's `.NAME.old` put back or dropped): no other run is writing there.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
from pathlib import Path

import torch

from fastft.apps.training.config import ConfigError
from fastft.files import lock_folder, recover_folder, remove_temporaries_in

LOCK_NAME = ".fastft-train.lock"


@contextlib.contextmanager
def hold_output_dir(output_dir: str | os.PathLike, accelerator):
    """Hold --output-dir for the `with` block (every process enters it; the main process holds the lock), after
    removing what killed runs left there. A ConfigError on every process when another run holds it."""
    lock, problem = None, None
    if accelerator.is_main_process:
        lock, problem = _try_lock(Path(output_dir))
    # every process learns the outcome (one small all-reduce), so that all of them stop with the same error
    refused = int(accelerator.reduce(torch.tensor(int(problem is not None), device=accelerator.device), "sum"))
    if refused:
        raise ConfigError(problem or f"--output-dir {output_dir}: the main process could not lock it (its error "
                                     "says why)")
    try:
        if lock is not None:
            clean_output_dir(Path(output_dir))
        accelerator.wait_for_everyone()
        yield
    finally:
        if lock is not None:
            lock.close()  # releases the lock


def _try_lock(output_dir: Path):
    """(the open lock file, None) when locked, (None, why not) when another process holds it or it cannot be
    taken (never an exception: the other processes wait for the outcome)."""
    return lock_folder(output_dir, LOCK_NAME, "fastft train run")


_STALE_CHECKPOINT = re.compile(r"\.step-\d{8}\.tmp")


def clean_output_dir(output_dir: Path) -> None:
    """What killed runs left in `output_dir` (call with the lock held, before this run writes there): temporary files
    and folders of fastft's naming whoever wrote them (no other run writes there; a live-looking writer may be a
    restarted container's process given the same PID), unfinished checkpoint folders, and a folder save's previous
    version (`recover_folder`)."""
    if not output_dir.is_dir():
        return
    remove_temporaries_in(output_dir)
    checkpoints = output_dir / "checkpoints"
    if checkpoints.is_dir():
        for stale in checkpoints.iterdir():
            if _STALE_CHECKPOINT.fullmatch(stale.name):
                shutil.rmtree(stale)
    for saved in ("adapter", "model"):
        recover_folder(output_dir / saved)
