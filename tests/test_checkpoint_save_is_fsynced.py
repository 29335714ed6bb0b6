"""Every file of a checkpoint is fsynced before its folder is renamed into place, and the rename itself after (a
power cut after the older checkpoint's removal must not leave a newest checkpoint of empty files). Linux: the fsynced
descriptors are named through /proc/self/fd."""
import os
import sys
from types import SimpleNamespace

import pytest
import torch

from fastft.apps.training import checkpoints as ckpt


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/fd")
def test_every_file_of_a_checkpoint_is_fsynced_before_it_is_published(tmp_path, monkeypatch):
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    synced, renamed = [], []
    fsync, replace = os.fsync, os.replace

    def recording_fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return fsync(fd)

    def recording_replace(src, dst, *args, **kwargs):
        renamed.append(len(synced))
        return replace(src, dst, *args, **kwargs)
    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(os, "replace", recording_replace)
    accelerator = SimpleNamespace(num_processes=1, process_index=0, is_main_process=True)
    final = ckpt.Checkpoints(tmp_path, accelerator).save(1, model, optimizer, {"plan": {}, "scheduler": {},
                                                                               "history": []})
    root = os.path.realpath(tmp_path / "checkpoints")
    tmp = os.path.join(root, ".step-00000001.tmp")
    assert len(renamed) == 1
    before_rename = synced[: renamed[0]]
    for name in sorted(p.name for p in final.iterdir()):
        assert os.path.join(tmp, name) in before_rename, f"{name} was not fsynced before the rename"
    assert tmp in before_rename  # the folder's entries too
    assert root in synced[renamed[0]:]  # and the rename, after it
