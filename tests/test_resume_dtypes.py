"""--resume compares the dtypes --dtype gave the weights (resume_checks.resolved_dtypes), not how --dtype was spelled:
auto is bf16 on a GPU and fp32 on the CPU, so a run started with auto on one and resumed on the other continued on a
base of another precision, silently (its fp32 adapters passed the checkpoint's weights check); and auto resumed as
fp32 on the CPU, the same weights, was refused."""
import shutil
from pathlib import Path

import pytest
import torch

from fastft.apps.training import checkpoints as ckpt
from fastft.apps.training.config import ConfigError, TrainConfig, to_yaml_dict
from fastft.apps.training.resume_checks import check_resumed_dtypes, check_resumed_settings, resolved_dtypes


@pytest.mark.parametrize("settings, device, weights, teacher", [
    ({}, "cpu", "float32", None), ({}, "cuda", "bfloat16", None), ({"dtype": "fp32"}, "cuda", "float32", None),
    ({"method": "full"}, "cuda", "float32", None), ({"dtype": "fp16"}, "cpu", "float16", None),
    ({"objective": "distill", "teacher": "t"}, "cuda", "bfloat16", "bfloat16"),
    ({"objective": "distill", "teacher": "t", "method": "full"}, "cuda", "float32", "bfloat16"),
    ({"objective": "distill", "teacher": "t"}, "cpu", "float32", "float32")])
def test_the_dtypes_are_what_dtype_gives_on_the_device(settings, device, weights, teacher):
    assert resolved_dtypes(TrainConfig(**settings), torch.device(device)) == {"weights": weights, "teacher": teacher}


def test_other_dtypes_are_refused_naming_both_and_an_old_checkpoint_passes():
    with pytest.raises(ConfigError, match=r"weights were of other dtypes \(--dtype: weights bfloat16 -> float32; "
                                          r"auto is bf16 on a GPU, fp32 on the CPU\)"):
        check_resumed_dtypes({"weights": "bfloat16", "teacher": None}, {"weights": "float32", "teacher": None},
                             Path("ckpt"))
    with pytest.raises(ConfigError, match=r"teacher bfloat16 -> float32"):
        check_resumed_dtypes({"weights": "float32", "teacher": "bfloat16"},
                             {"weights": "float32", "teacher": "float32"}, Path("ckpt"))
    check_resumed_dtypes({"weights": "float32", "teacher": None}, {"weights": "float32", "teacher": None}, Path("c"))
    check_resumed_dtypes(None, {"weights": "float32", "teacher": None}, Path("ckpt"))  # kept none: --dtype compares


def test_dtype_may_change_its_spelling_only_where_the_dtypes_were_kept():
    saved = ckpt.comparable_settings(to_yaml_dict(TrainConfig(dtype="auto")))
    check_resumed_settings(TrainConfig(dtype="fp32"), saved, Path("ckpt"), dtypes_recorded=True)
    with pytest.raises(ConfigError, match=r"--dtype 'auto' -> 'fp32'"):
        check_resumed_settings(TrainConfig(dtype="fp32"), saved, Path("ckpt"), dtypes_recorded=False)


@pytest.fixture(scope="module")
def _bf16_run(tmp_path_factory):
    """A tiny 2-step run with a checkpoint at each step, its base in bf16: what --dtype auto gives on a GPU."""
    from fastft.apps.cli import main
    from tests.train_utils import save_tiny_checkpoint

    root = tmp_path_factory.mktemp("dtypes")
    tiny = save_tiny_checkpoint(root / "tiny", layers=1)
    argv = ["train", "--model", str(tiny), "--steps", "2", "--batch-size", "2", "--eval-examples", "0",
            "--max-length", "16", "--rank", "4", "--save-every", "1", "--output-dir"]
    assert main([*argv, str(root / "run"), "--dtype", "bf16"]) == 0
    return root / "run", argv


def test_a_gpu_runs_auto_resumed_on_the_cpu_is_refused(_bf16_run, tmp_path, capsys):
    from fastft.apps.cli import main

    run, argv = _bf16_run
    copy = shutil.copytree(run, tmp_path / "run")
    state_file = copy / "checkpoints" / "step-00000002" / "trainer_state.pt"
    state = torch.load(state_file, weights_only=False)
    state["config"]["dtype"] = "auto"  # as the GPU's run keeps it: the word, not the bf16 it gave there
    torch.save(state, state_file)
    (copy / "metrics.json").unlink()  # killed after its last checkpoint: a resume trains again
    with pytest.raises(SystemExit) as info:
        main([*argv, str(copy), "--resume"])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "weights were of other dtypes (--dtype: weights bfloat16 -> float32" in err, err
    assert state["dtypes"] == {"weights": "bfloat16", "teacher": None}  # what the checkpoint keeps


def test_a_resume_says_when_other_code_wrote_its_checkpoint(_bf16_run, tmp_path, capsys):
    """Checkpoints keep the writer's code (provenance.git_commit): a resume by other code says its steps follow this
    code's arithmetic (audit round 16: DoRA's fp32 rank path, prefix tuning through the fused loss moved resumed
    runs of 12-03 / 12-05 checkpoints off their writers' by up to 3.9e-5, silently); by the same code, nothing."""
    from fastft.apps.cli import main
    from fastft.apps.provenance import git_commit

    run, argv = _bf16_run
    for code, said in ((None, "same code"), ("0123abcd", "fastft 0123abcd"), ("drop", "an earlier fastft")):
        copy = shutil.copytree(run, tmp_path / f"run-{said}")
        (copy / "metrics.json").unlink()  # killed after its last checkpoint: a resume trains again
        state_file = copy / "checkpoints" / "step-00000002" / "trainer_state.pt"
        state = torch.load(state_file, weights_only=False)
        assert state["code"] == git_commit()
        if code == "drop":
            del state["code"]
        elif code is not None:
            state["code"] = code
        torch.save(state, state_file)
        capsys.readouterr()
        assert main([*argv, str(copy), "--resume", "--dtype", "bf16"]) == 0
        out = capsys.readouterr()
        line = next(x for x in (out.out + out.err).splitlines() if "resumed from" in x)
        if code is None:
            assert "written by" not in line, line
        else:
            assert f"written by {said}" in line and f"continued by {git_commit()}" in line, line


def test_a_checkpoint_keeping_no_dtypes_compares_dtype_as_given(_bf16_run, tmp_path, capsys):
    """A checkpoint written before they kept the dtypes (it keeps its layout): --dtype compares as spelled, so bf16
    resumed as fp32 is refused, not continued on another precision."""
    from fastft.apps.cli import main

    run, argv = _bf16_run
    copy = shutil.copytree(run, tmp_path / "run")
    state_file = copy / "checkpoints" / "step-00000002" / "trainer_state.pt"
    state = torch.load(state_file, weights_only=False)
    assert "layout" in state
    del state["dtypes"]
    torch.save(state, state_file)
    (copy / "metrics.json").unlink()
    with pytest.raises(SystemExit) as info:
        main([*argv, str(copy), "--resume", "--dtype", "fp32"])
    assert info.value.code == 2
    assert "--dtype 'bf16' -> 'fp32'" in capsys.readouterr().err
