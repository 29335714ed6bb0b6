"""Checkpoints.save publishing a checkpoint: the same step saved again replaces it (a folder rename cannot replace a
non-empty folder), a killed save's temporary folder does not block the next save of its step, and afterwards the
checkpoint just written is the only one, so `latest()` (what --resume takes) is it."""
from types import SimpleNamespace

import torch
from safetensors.torch import load_file

from fastft.apps.training import checkpoints as ckpt

_ACC = SimpleNamespace(num_processes=1, process_index=0, is_main_process=True)
_STATE = {"plan": {}, "scheduler": {}, "history": []}


def _model_and_optimizer():
    model = torch.nn.Linear(3, 2)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3)


def test_the_same_step_saved_again_replaces_the_checkpoint(tmp_path):
    model, optimizer = _model_and_optimizer()
    checkpoints = ckpt.Checkpoints(tmp_path, _ACC)
    first = checkpoints.save(3, model, optimizer, {**_STATE, "history": ["first"]})
    with torch.no_grad():
        model.weight.add_(1.0)
    again = checkpoints.save(3, model, optimizer, {**_STATE, "history": ["second"]})
    assert again == first and [p.name for p in checkpoints.root.iterdir()] == ["step-00000003"]
    assert checkpoints.trainer_state(again)["history"] == ["second"]
    assert torch.equal(load_file(str(again / "trainable.safetensors"))["weight"], model.weight.detach())


def test_a_killed_saves_temporary_folder_is_removed_by_the_next_save(tmp_path):
    model, optimizer = _model_and_optimizer()
    checkpoints = ckpt.Checkpoints(tmp_path, _ACC)
    for step in (2, 4):  # killed mid-save: half a checkpoint in the temporary folder of its step
        (checkpoints.root / f".step-{step:08d}.tmp").mkdir(parents=True)
        (checkpoints.root / f".step-{step:08d}.tmp" / "optimizer.pt").write_bytes(b"half")
    final = checkpoints.save(2, model, optimizer, _STATE)
    assert sorted(p.name for p in checkpoints.root.iterdir()) == ["step-00000002"]
    assert checkpoints.trainer_state(final)["step"] == 2


def test_after_a_save_the_new_checkpoint_is_the_only_one(tmp_path):
    model, optimizer = _model_and_optimizer()
    checkpoints = ckpt.Checkpoints(tmp_path, _ACC)
    checkpoints.save(9, model, optimizer, _STATE)  # e.g. a checkpoint put back from a backup of a longer run
    checkpoints.save(1, model, optimizer, _STATE)
    final = checkpoints.save(5, model, optimizer, _STATE)
    assert [p.name for p in checkpoints.root.iterdir()] == ["step-00000005"]
    assert checkpoints.latest() == final and checkpoints.trainer_state(final)["step"] == 5
