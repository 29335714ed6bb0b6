"""What marks a measurement's code dirty (fastft.apps.provenance.code_state), past the cases the bench test covers:
edits under csrc/ (the compiled extension decides a measurement too), edits staged with `git add` (still not
committed), and new files told apart by their content (two different new files of one name are two codes). And
kernel_environment records every environment variable the kernels and ops read."""
import pathlib
import re
import subprocess

import pytest

import fastft
from fastft.apps import provenance
from fastft.apps.provenance import code_state

pytestmark = pytest.mark.skipif(subprocess.run(["git", "--version"], capture_output=True).returncode != 0,
                                reason="needs git")


def _repo(tmp_path):
    def git(*args):
        return subprocess.run(["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t", *args],
                              check=True, capture_output=True, text=True).stdout.strip()

    for folder, name in (("fastft", "op.py"), ("csrc", "op.cpp"), ("benchmarks", "b.py"), ("docs", "d.md")):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / name).write_text("1\n")
    git("init", "-q")
    git("add", "-A")
    git("commit", "-qm", "one")
    return git, git("rev-parse", "HEAD")


def test_csrc_edits_and_staged_edits_make_the_code_dirty(tmp_path):
    git, head = _repo(tmp_path)
    assert code_state(tmp_path) == head
    (tmp_path / "docs" / "d.md").write_text("2\n")            # not code
    assert code_state(tmp_path) == head
    (tmp_path / "csrc" / "op.cpp").write_text("2\n")
    assert code_state(tmp_path).startswith(head + "+dirty.")
    (tmp_path / "csrc" / "op.cpp").write_text("1\n")
    (tmp_path / "fastft" / "op.py").write_text("2\n")
    unstaged = code_state(tmp_path)
    git("add", "fastft/op.py")                                # staged, not committed: the same edit
    assert code_state(tmp_path) == unstaged != head


def test_new_files_of_one_name_and_other_contents_are_other_codes(tmp_path):
    _, head = _repo(tmp_path)
    new = tmp_path / "fastft" / "new.py"
    new.write_text("a = 1\n")
    first = code_state(tmp_path)
    new.write_text("a = 2\n")
    second = code_state(tmp_path)
    assert first.startswith(head + "+dirty.") and second.startswith(head + "+dirty.") and first != second
    new.write_text("a = 1\n")
    assert code_state(tmp_path) == first


def test_kernel_environment_covers_what_the_kernels_and_ops_read(monkeypatch):
    root = pathlib.Path(fastft.__file__).parent
    read = set()
    for folder in ("kernels", "ops"):
        for path in (root / folder).rglob("*.py"):
            text = path.read_text()
            read |= set(re.findall(r"environ(?:\.get)?[(\[]\s*\"([A-Z0-9_]+)\"", text))
            read |= set(re.findall(r"^ENV = \"([A-Z0-9_]+)\"", text, re.M))
    assert {"FASTFT_DETERMINISTIC", "FASTFT_AUTOTUNE", "FASTFT_LORA_PATH"} <= read   # the scan finds them
    assert read <= set(provenance.KERNEL_ENV), sorted(read - set(provenance.KERNEL_ENV))
    for name in read:
        monkeypatch.setenv(name, "x")
    recorded = provenance.kernel_environment()
    assert all(recorded[name] == "x" for name in read), recorded
