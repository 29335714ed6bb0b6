"""The `fastft` program (fastft.apps.cli.command, the console script and `python -m fastft.apps.cli`) takes
torchrun's process group down when it ends, done or failed: one left to the interpreter's exit aborted a finished
run's process (gloo: "terminate called without an active exception", SIGABRT) and torchrun reported the launch
failed. main() keeps it (several runs in one process share it)."""
import pytest
import torch.distributed as dist

from fastft.apps import cli


@pytest.fixture
def process_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


@pytest.mark.parametrize("ends", ["done", "stopped", "raised"])
def test_the_command_destroys_the_process_group_however_main_ends(ends, process_group, monkeypatch):
    def main(argv):
        assert dist.is_initialized()
        if ends == "raised":
            raise SystemExit(2)
        return 0 if ends == "done" else 1

    monkeypatch.setattr(cli, "main", main)
    if ends == "raised":
        with pytest.raises(SystemExit):
            cli.command(["train"])
    else:
        assert cli.command(["train"]) == (0 if ends == "done" else 1)
    assert not dist.is_initialized()


def test_main_keeps_it(process_group, capsys):
    assert cli.main(["study", "--plan"]) == 0  # prints the plan: a quick real run of main
    assert "cells" in capsys.readouterr().out
    assert dist.is_initialized()


def test_the_console_script_is_the_command():
    import tomllib
    from pathlib import Path

    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
    assert project["scripts"]["fastft"] == "fastft.apps.cli:command"
