"""Round 15 of the mutation audit (the changes of ac7afe4 and the two before it): tests for mutants of those changes
that the suite let through. Each passes on HEAD and fails on its mutant."""
from __future__ import annotations

import threading

import pytest
import torch

from fastft.kernels import runtime


# --- apps/cli.py: the Ctrl-C lines ---------------------------------------------------------------------------------

def _interrupted(*args, **kwargs):
    raise KeyboardInterrupt


def test_train_interrupted_while_its_settings_are_read_says_so_in_one_line(monkeypatch, capsys, tmp_path):
    """A Ctrl-C inside config_from_args: no config to name a checkpoint from; still one line and 130 (not an
    UnboundLocalError / AttributeError traceback)."""
    import fastft.apps.training.arguments as arguments
    from fastft.apps import cli

    monkeypatch.setattr(arguments, "config_from_args", _interrupted)
    assert cli.main(["train", "--steps", "2", "--output-dir", str(tmp_path / "run")]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fastft train: interrupted (Ctrl-C)"), err
    assert "continues from the last checkpoint, if one was written" in err[0], err


def test_train_interrupted_in_an_output_dir_without_checkpoints_names_the_checkpoints_folder(monkeypatch, capsys,
                                                                                            tmp_path):
    import fastft.apps.training as training
    from fastft.apps import cli

    out = tmp_path / "run"
    out.mkdir()
    monkeypatch.setattr(training, "validate", lambda cfg: cfg)
    monkeypatch.setattr(training, "train", _interrupted)
    assert cli.main(["train", "--steps", "2", "--output-dir", str(out)]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"before its first checkpoint (none in {out / 'checkpoints'})" in err[0], err


def test_a_ctrl_c_outside_bench_and_study_is_let_through_by_the_program(monkeypatch):
    """command() answers a Ctrl-C of bench / study only; any other (train's before main's own try) is raised on,
    not turned into a KeyError."""
    from fastft.apps import cli

    monkeypatch.setattr(cli, "main", _interrupted)
    with pytest.raises(KeyboardInterrupt):
        cli.command(["train", "--steps", "2"])


def test_the_program_reads_its_command_from_sys_argv_for_the_ctrl_c_line(monkeypatch, capsys, tmp_path):
    """`fastft study` as installed calls command() with no argv: the Ctrl-C line reads the name from sys.argv."""
    from fastft.apps import cli
    from fastft.apps.study import runner as study_runner

    monkeypatch.setattr(study_runner, "check_inputs", lambda config: {})
    monkeypatch.setattr(study_runner, "run_study", _interrupted)
    monkeypatch.setattr("sys.argv", ["fastft", "study", "--quick", "--methods", "lora", "--no-progress",
                                     "--output-dir", str(tmp_path)])
    assert cli.command() == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fastft study: interrupted (Ctrl-C); the same command resumes"), err


# --- kernels/runtime.py: interpreted launches take turns, reentrantly ------------------------------------------------

@pytest.mark.skipif(not runtime.INTERPRET, reason="the Triton interpreter's launches")
def test_an_interpreted_launch_made_inside_another_in_the_same_thread_runs():
    """The turns' lock is reentrant (a launch made within a launch, here from its grid function): a plain lock
    deadlocked the thread."""
    import triton
    import triton.language as tl

    @triton.jit
    def add_one(x_ptr, n, BLOCK: tl.constexpr):
        offsets = tl.arange(0, BLOCK)
        mask = offsets < n
        tl.store(x_ptr + offsets, tl.load(x_ptr + offsets, mask=mask) + 1, mask=mask)

    inner, outer, done = torch.zeros(5), torch.zeros(5), []

    def grid(meta):
        if not done:
            done.append(True)
            add_one[(1,)](inner, inner.numel(), BLOCK=8)
        return (1,)

    thread = threading.Thread(target=lambda: add_one[grid](outer, outer.numel(), BLOCK=8), daemon=True)
    thread.start()
    thread.join(timeout=30)
    assert not thread.is_alive(), "the launch inside a launch waited for itself"
    assert torch.equal(inner, torch.ones(5)) and torch.equal(outer, torch.ones(5))


# --- apps/training/loop.py: the checkpoint keeps its layout, and --resume compares it --------------------------------

@pytest.fixture(scope="module")
def _two_step_run(tmp_path_factory):
    """A tiny 2-step run with a checkpoint at each step (one process: layout "none")."""
    from fastft.apps.cli import main
    from tests.train_utils import save_tiny_checkpoint

    root = tmp_path_factory.mktemp("layout")
    tiny = save_tiny_checkpoint(root / "tiny", layers=1)
    argv = ["train", "--model", str(tiny), "--steps", "2", "--batch-size", "2", "--eval-examples", "0",
            "--max-length", "16", "--save-every", "1", "--output-dir", str(root / "run")]
    assert main(argv) == 0
    return root / "run", argv[:-1]


def _resume_error(argv, capsys) -> str:
    from fastft.apps.cli import main

    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


def _state(run):
    return run / "checkpoints" / "step-00000002" / "trainer_state.pt"


def test_a_checkpoint_keeps_its_runs_layout(_two_step_run):
    run, _ = _two_step_run
    assert torch.load(_state(run), weights_only=False)["layout"] == "none"


def test_resume_refuses_a_checkpoint_of_another_layout(_two_step_run, tmp_path, capsys):
    import shutil

    run, argv = _two_step_run
    copy = shutil.copytree(run, tmp_path / "run")
    state = torch.load(_state(copy), weights_only=False)
    torch.save({**state, "layout": "ddp"}, _state(copy))
    err = _resume_error([*argv, str(copy), "--resume"], capsys)
    assert "state was whole on every process (DDP), this run's is in one process" in err, err


def test_resume_of_a_checkpoint_without_a_layout_compares_distributed_as_given(_two_step_run, tmp_path, capsys):
    import shutil

    run, argv = _two_step_run
    copy = shutil.copytree(run, tmp_path / "run")
    state = torch.load(_state(copy), weights_only=False)
    del state["layout"]
    torch.save(state, _state(copy))
    err = _resume_error([*argv, str(copy), "--resume", "--distributed", "none"], capsys)
    assert "--distributed 'auto' -> 'none'" in err, err


# --- apps/training/run_setup.py: inductor takes torch's generator only while an inductor-compiled run lasts --------

def test_an_eager_run_leaves_inductors_random_setting_alone():
    import torch._inductor.config as inductor

    from fastft.apps.training.config import TrainConfig
    from fastft.apps.training.run_setup import inductor_takes_torch_random

    with inductor.patch(fallback_random=False):
        with inductor_takes_torch_random(TrainConfig(compile="off", compile_backend="inductor")):
            assert inductor.fallback_random is False
        with inductor_takes_torch_random(TrainConfig(compile="default", compile_backend="inductor")):
            assert inductor.fallback_random is True
        assert inductor.fallback_random is False
