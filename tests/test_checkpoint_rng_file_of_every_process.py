"""A checkpoint of an N-process run holds one RNG file per process; `Checkpoints.trainer_state` checks every one of
them before any model loads (a missing rng-1.pt is named, not found only when process 1 loads it)."""
from types import SimpleNamespace

import pytest
import torch

from fastft.apps.training import checkpoints as ckpt
from fastft.apps.training.config import ConfigError


def _accelerator(index: int, processes: int = 2):
    return SimpleNamespace(num_processes=processes, process_index=index, is_main_process=index == 0)


def test_a_missing_rng_file_of_another_process_is_named(tmp_path):
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    state = {"plan": {}, "scheduler": {}, "history": []}
    step = ckpt.Checkpoints(tmp_path, _accelerator(0)).save(2, model, optimizer, state)
    torch.save(ckpt.rng_state(), step / "rng-1.pt")  # what process 1 writes
    for index in (0, 1):
        assert ckpt.Checkpoints(tmp_path, _accelerator(index)).trainer_state(step)["step"] == 2
    (step / "rng-1.pt").unlink()
    for index in (0, 1):
        with pytest.raises(ConfigError, match=r"is damaged: rng-1\.pt: it is missing"):
            ckpt.Checkpoints(tmp_path, _accelerator(index)).trainer_state(step)
