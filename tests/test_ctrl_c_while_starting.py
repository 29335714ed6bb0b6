"""Ctrl-C in the `fastft` command's first seconds, while torch, transformers and peft load: one line and status 130,
as every other stop, not Python's traceback. `import fastft` is quick (its modules load on first use), so the command
holds its Ctrl-C handling before anything heavy is imported. The signal is real: the child process sends itself
SIGINT when it starts importing transformers."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

import fastft
from fastft.apps import cli

ROOT = Path(__file__).resolve().parents[1]

# Sends this process SIGINT as `transformers` starts to load (Python raises KeyboardInterrupt at its next line),
# then runs the console script's function.
_CHILD = """
import os, signal, sys

class SigintOnTransformers:
    def find_spec(self, name, path=None, target=None):
        if name == "transformers":
            sys.meta_path.remove(self)
            os.kill(os.getpid(), signal.SIGINT)
        return None

sys.meta_path.insert(0, SigintOnTransformers())
from fastft.apps.cli import command
assert "torch" not in sys.modules, "the command's module imported torch before its Ctrl-C handling"
sys.exit(command(sys.argv[1:]))
"""


def _run(*argv, code=_CHILD):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, env=env, timeout=300,
                          cwd=ROOT)


@pytest.mark.parametrize("argv", [["train", "--steps", "1"], ["study", "--plan"], ["--help"]])
def test_a_real_sigint_while_the_command_loads_is_one_line(argv):
    done = _run(*argv)
    assert done.returncode == 130, done.stderr[-2000:]
    assert done.stderr.strip().splitlines() == [
        "fastft: interrupted (Ctrl-C) while starting; nothing was run or written"], done.stderr[-2000:]
    assert done.stdout == ""


def test_import_fastft_loads_nothing_heavy_and_every_name_resolves():
    code = ("import sys, fastft; heavy = [m for m in ('torch', 'transformers', 'peft') if m in sys.modules]; "
            "print(heavy)")
    assert _run(code=code).stdout.strip() == "[]"
    for name in fastft.__all__:
        assert getattr(fastft, name) is not None, name
    assert fastft.lora_linear is fastft.ops.lora_linear
    assert fastft.quant.NF4Weight.__module__ == "fastft.quant.nf4_weight"
    assert {"ops", "quant", "get_peft_model", "lora_linear"} <= set(dir(fastft))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        fastft.nope


def test_in_process_main_lets_it_through_and_command_says_one_line(monkeypatch, capsys):
    def parser():
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_parser", parser)
    with pytest.raises(KeyboardInterrupt):  # main: a caller in the same process stops as a kill would stop it
        cli.main(["train"])
    assert cli.command(["train"]) == 130
    assert capsys.readouterr().err == "fastft: interrupted (Ctrl-C) while starting; nothing was run or written\n"
