"""A --data, --eval-data or --config file that cannot be read (its permissions, a failing disk) is a user error:
one line naming the file and why, exit status 2. Each was an OSError's traceback and exit status 1: only
decoding errors were caught."""
import errno
import io
import os
from pathlib import Path

import pytest

from fastft.apps.cli import main
from fastft.apps.training.arguments import read_yaml_config
from fastft.apps.training.config import ConfigError, TrainConfig, validate
from fastft.apps.training.records import DataError, file_fingerprint, read_jsonl

_MEM = "/proc/self/mem"  # a real file whose first bytes cannot be read (EIO: address 0 is never mapped)


@pytest.fixture(params=["permission denied", "input/output error"])
def unreadable(request, tmp_path, monkeypatch):
    """A path whose reads fail: a file open() refuses (chmod 000 stops no root test run, so open is patched for
    it alone), or /proc/self/mem."""
    if request.param == "input/output error":
        if not Path(_MEM).is_file():
            pytest.skip("no /proc/self/mem")
        return _MEM
    path = tmp_path / "locked"
    path.write_text('{"text": "hi"}\n')
    real_open = io.open

    def refusing_open(file, *args, **kwargs):
        if str(file) == str(path):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr("builtins.open", refusing_open)
    monkeypatch.setattr(io, "open", refusing_open)  # pathlib's read_text opens through io.open
    return str(path)


def test_readers_name_the_unreadable_file(unreadable):
    for read in (lambda p: read_jsonl(p, "sft"), file_fingerprint):
        with pytest.raises(DataError, match=rf"^{unreadable}: cannot read \(\w"):
            read(unreadable)
    with pytest.raises(ConfigError, match=rf"^--config {unreadable}: cannot read \(\w"):
        read_yaml_config(unreadable)


@pytest.mark.parametrize("flag", ["--data", "--config"])
def test_train_exits_2_with_one_line(unreadable, flag, tmp_path, capsys):
    model = tmp_path / "model"  # --model is only checked for its config.json before the data is read
    model.mkdir()
    (model / "config.json").write_text("{}")
    with pytest.raises(SystemExit) as info:
        main(["train", "--model", str(model), flag, unreadable, "--output-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith(f"fastft train: error: {flag + ' ' if flag == '--config' else ''}"
                                                   f"{unreadable}: cannot read (")


def _unsearchable(monkeypatch, path: Path) -> None:
    """Path.stat of `path` fails as it does under a folder without search permission (root ignores the bits)."""
    real_stat = Path.stat

    def stat(self, *args, **kwargs):
        if self == path:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
        return real_stat(self, *args, **kwargs)

    monkeypatch.setattr(Path, "stat", stat)


def test_a_file_in_a_folder_that_cannot_be_searched(tmp_path, monkeypatch):
    """Path.is_file raises PermissionError (not False) where a folder on the way lacks search permission."""
    path = tmp_path / "hidden" / "data.jsonl"
    _unsearchable(monkeypatch, path)
    data = tmp_path / "train.jsonl"
    data.write_text('{"text": "hi"}\n')
    with pytest.raises(ConfigError, match=rf"^--eval-data {path}: cannot read \(Permission denied\)"):
        validate(TrainConfig(data=str(data), eval_data=str(path)))
    with pytest.raises(ConfigError, match=rf"^--config {path}: cannot read \(Permission denied\)"):
        read_yaml_config(path)


def test_a_model_folder_that_cannot_be_searched(tmp_path, monkeypatch):
    """--model's config.json check raised PermissionError where a folder on the way lacks search permission."""
    from fastft.apps.models import model_problem

    _unsearchable(monkeypatch, tmp_path / "hidden" / "config.json")
    assert model_problem(str(tmp_path / "hidden"), "--model") == (
        f"--model '{tmp_path / 'hidden'}': cannot read it (Permission denied); check its permissions")
