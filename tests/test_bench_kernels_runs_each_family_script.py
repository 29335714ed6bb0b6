"""`fastft bench kernels` on a GPU: each family's benchmarks/gpu_<family>.py runs in its own process from the
checkout's root, told the results folder as an absolute $OUT (a relative --output-dir would otherwise resolve
against the checkout, not where the command was typed), with the checkout on PYTHONPATH; any family that fails
makes the exit status 1, all passing 0. The processes are stand-ins here (no GPU needed)."""
import os
from pathlib import Path

import pytest

from fastft.apps.bench import kernels


@pytest.fixture
def launched(monkeypatch, tmp_path):
    calls = []
    rcs = {}

    def call(argv, env, cwd):
        calls.append({"script": Path(argv[-1]).name, "env": env, "cwd": Path(cwd)})
        return rcs.get(Path(argv[-1]).name, 0)

    monkeypatch.setattr(kernels.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(kernels.subprocess, "call", call)
    monkeypatch.chdir(tmp_path)
    return calls, rcs


def test_each_family_runs_with_an_absolute_out_from_the_checkout(launched, tmp_path):
    calls, _ = launched
    assert kernels.run_kernels(["lora", "nf4"], "results/kernels") == 0
    root = kernels.benchmarks_dir().parent
    assert [c["script"] for c in calls] == ["gpu_lora.py", "gpu_nf4.py"]
    for c in calls:
        assert c["env"]["OUT"] == str(tmp_path / "results" / "kernels") and os.path.isabs(c["env"]["OUT"])
        assert c["env"]["PYTHONPATH"].split(os.pathsep)[0] == str(root) and c["cwd"] == root
    assert (tmp_path / "results" / "kernels").is_dir()


def test_a_failing_family_makes_the_exit_status_1_and_the_rest_still_run(launched):
    calls, rcs = launched
    rcs["gpu_lora.py"] = 3
    assert kernels.run_kernels(["lora", "nf4", "attention"], "out") == 1
    assert [c["script"] for c in calls] == ["gpu_lora.py", "gpu_nf4.py", "gpu_attention.py"]
