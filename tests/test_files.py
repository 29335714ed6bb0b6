"""fastft.files, the one atomic writer of files and folders: old or new content, never half; modes as the umask
gives them; no temporaries left behind, whatever fails."""
import os
import shutil
import stat

import pytest

from fastft import files
from fastft.files import atomic_write, replace_folder


def test_atomic_write_text_bytes_and_callable(tmp_path):
    assert atomic_write(tmp_path / "a" / "t.txt", "text").read_text() == "text"
    assert atomic_write(tmp_path / "b.bin", b"\x00\x01").read_bytes() == b"\x00\x01"
    atomic_write(tmp_path / "c.txt", lambda p: open(p, "w").write("by callable"))
    assert (tmp_path / "c.txt").read_text() == "by callable"

    def broken(path):
        open(path, "w").write("half")
        raise OSError("disk full")
    with pytest.raises(OSError):
        atomic_write(tmp_path / "b.bin", broken)
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"  # the old file is intact, no temporary is left
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a", "b.bin", "c.txt", "t.txt"]
    with pytest.raises(TypeError, match="content must be str, bytes or a callable"):
        atomic_write(tmp_path / "d.txt", 3)
    assert not (tmp_path / "d.txt").exists()


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_atomic_write_follows_the_umask(tmp_path, mask):
    """mkstemp makes 0600: a result file or an NF4 model written through it was private to its owner."""
    old = os.umask(mask)
    try:
        for path in (atomic_write(tmp_path / "t.txt", "x"), atomic_write(tmp_path / "w.bin", lambda p: open(p, "wb"))):
            assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask, path
    finally:
        os.umask(old)


def test_replace_folder_swaps_whole_versions(tmp_path):
    target = tmp_path / "model"

    def write(version):
        def fill(folder):
            (folder / "sub").mkdir()
            (folder / "sub" / "w.txt").write_text(version)
            (folder / f"only-in-{version}").touch()
        return fill

    old = os.umask(0o022)
    try:
        assert replace_folder(target, write("v1")) == target
        replace_folder(target, write("v2"))
    finally:
        os.umask(old)
    assert (target / "sub" / "w.txt").read_text() == "v2"
    assert sorted(p.name for p in target.iterdir()) == ["only-in-v2", "sub"]  # nothing of v1 survives
    assert stat.S_IMODE(target.stat().st_mode) == 0o755 and stat.S_IMODE((target / "only-in-v2").stat().st_mode) == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]

    def broken(folder):
        (folder / "half").write_text("x")
        raise OSError("disk full")
    with pytest.raises(OSError, match="disk full"):
        replace_folder(target, broken)
    assert (target / "sub" / "w.txt").read_text() == "v2"  # the previous version stands, no temporary is left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def _fill(version):
    def fill(folder):
        (folder / "w.txt").write_text(version)
    return fill


def test_replace_folder_reports_a_previous_version_it_cannot_remove(tmp_path, monkeypatch):
    """The old code removed the previous version with ignore_errors and left it behind silently."""
    target = replace_folder(tmp_path / "model", _fill("v1"))
    real_rmtree = shutil.rmtree

    def failing_rmtree(tree, *args, **kwargs):  # the previous version, wherever the swap moved it
        if os.path.isfile(os.path.join(tree, "w.txt")) and open(os.path.join(tree, "w.txt")).read() == "v1":
            if kwargs.get("ignore_errors"):
                return None
            raise PermissionError(13, "Permission denied", str(tree))
        return real_rmtree(tree, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", failing_rmtree)
    with pytest.raises(OSError, match=r"could not be removed .*delete it by hand"):
        replace_folder(target, _fill("v2"))
    assert (target / "w.txt").read_text() == "v2"  # the new version is in place


def test_replace_folder_removes_a_stale_previous_version(tmp_path):
    """Both `model` and `.model.old`: a save died after its swap; `.model.old` is the version before it."""
    target = replace_folder(tmp_path / "model", _fill("v1"))
    shutil.copytree(target, tmp_path / ".model.old")
    replace_folder(target, _fill("v2"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"] and (target / "w.txt").read_text() == "v2"


def test_replace_folder_restores_the_version_an_interrupted_save_moved_aside(tmp_path, monkeypatch):
    """A save killed between its two renames leaves the last complete version only in `.model.old`; the old code
    deleted it when the next save started, so a second failing save lost it. (Two renames: where the file system
    cannot exchange two paths in one step.)"""
    target = replace_folder(tmp_path / "model", _fill("v1"))
    real_replace = os.replace
    monkeypatch.setattr(files, "_exchange", lambda a, b: False)

    def killed_before_second_rename(src, dst):
        if str(dst) == str(target):
            raise KeyboardInterrupt("killed")
        return real_replace(src, dst)

    monkeypatch.setattr(files.os, "replace", killed_before_second_rename)
    with pytest.raises(KeyboardInterrupt):
        replace_folder(target, _fill("v2"))
    monkeypatch.setattr(files.os, "replace", real_replace)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".model.old"]

    def disk_full(folder):
        raise OSError(28, "No space left on device")
    with pytest.raises(OSError, match="No space left"):
        replace_folder(target, disk_full)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"] and (target / "w.txt").read_text() == "v1"
    replace_folder(target, _fill("v3"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"] and (target / "w.txt").read_text() == "v3"


@pytest.mark.parametrize("save", ["replace_folder", "merge_into_folder"])
def test_folder_saves_remove_temporaries_of_killed_saves(tmp_path, save):
    """A SIGKILLed save leaves `.model.tmp-*` behind; the old code never removed it."""
    save = getattr(files, save)
    (tmp_path / ".model.tmp-k1lled_x" / "sub").mkdir(parents=True)  # mkdtemp's 8 random characters
    (tmp_path / ".model.tmp-k1lled_x" / "sub" / "half").write_text("x")
    (tmp_path / ".model2.tmp-otherabc").mkdir()  # another folder's
    (tmp_path / ".model.tmp-notes").mkdir()  # a user's, not of fastft's naming
    save(tmp_path / "model", _fill("v1"))
    assert sorted(p.name for p in tmp_path.iterdir()) == [".model.tmp-notes", ".model2.tmp-otherabc", "model"]


def test_a_dead_writers_temporary_is_removed_when_its_pid_lives_again(tmp_path):
    """Temporaries name their writer's start time: a process given a killed writer's PID later (a restarted
    container's PIDs start from 1 again) is not taken for it. Faked with this process's PID and another start time."""
    owner = files._owner()
    host, pid, start = owner.split("-")
    live = tmp_path / f".model.tmp-{owner}-abcd_123"  # this process's own write in progress
    reused = tmp_path / f".model.tmp-{host}-{pid}-{int(start) + 1}-efgh_456"  # an earlier process of this PID
    pid_only = tmp_path / f".model.tmp-{host}-{pid}-ijkl_789"  # the earlier naming: the PID alone decides
    for folder in (live, reused, pid_only):
        folder.mkdir()
    files._WRITING.add(str(live))  # a write of this process holds it (one no write holds is an interrupted one's)
    assert files.remove_stale_temporaries(tmp_path / "model") == [reused]
    files._WRITING.discard(str(live))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, pid_only.name])


def test_merge_into_folder_writes_a_linked_subfolder_through_its_link(tmp_path):
    """A named adapter kept elsewhere behind a link (adapter/second -> elsewhere): the save writes into the linked
    folder, file by file, and the link stays, as peft's save_pretrained does."""
    elsewhere = tmp_path / "big_disk" / "second"
    (elsewhere / "sub").mkdir(parents=True)
    (elsewhere / "adapter_model.safetensors").write_text("old weights")
    (elsewhere / "notes.txt").write_text("mine")
    target = tmp_path / "adapter"
    target.mkdir()
    (target / "second").symlink_to(os.path.relpath(elsewhere, target))
    (target / "adapter_config.json").write_text("old config")

    def write(folder):  # what save_pretrained(selected_adapters=["second"]) writes
        (folder / "second" / "sub").mkdir(parents=True)
        (folder / "second" / "adapter_model.safetensors").write_text("new weights")
        (folder / "second" / "sub" / "x.json").write_text("new")
    files.merge_into_folder(target, write)
    assert (target / "second").is_symlink() and (target / "second").resolve() == elsewhere.resolve()
    assert (elsewhere / "adapter_model.safetensors").read_text() == "new weights"
    assert (elsewhere / "sub" / "x.json").read_text() == "new" and (elsewhere / "notes.txt").read_text() == "mine"
    assert (target / "adapter_config.json").read_text() == "old config"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "big_disk"]
    assert sorted(p.name for p in elsewhere.iterdir()) == ["adapter_model.safetensors", "notes.txt", "sub"]


def test_merge_into_folder_replaces_what_it_writes_and_keeps_the_rest(tmp_path):
    merge_into_folder = files.merge_into_folder
    target = tmp_path / "adapter"

    def write(version):
        def fill(folder):
            (folder / "w.txt").write_text(version)
            (folder / "named").mkdir()
            (folder / "named" / "w.txt").write_text(version)
            (folder / "was_a_file").mkdir()
            (folder / "was_a_folder").write_text(version)
        return fill

    old = os.umask(0o022)
    try:
        assert merge_into_folder(target, write("v1")) == target
        (target / "metrics.json").write_text("mine")
        (target / "named" / "keep.txt").write_text("mine")
        shutil.rmtree(target / "was_a_file")
        (target / "was_a_file").write_text("file")
        (target / "was_a_folder").unlink()
        (target / "was_a_folder").mkdir()
        (target / "was_a_folder" / "x").write_text("x")
        merge_into_folder(target, write("v2"))
    finally:
        os.umask(old)
    assert sorted(p.name for p in target.iterdir()) == ["metrics.json", "named", "w.txt", "was_a_file",
                                                        "was_a_folder"]
    assert (target / "w.txt").read_text() == "v2" and (target / "named" / "w.txt").read_text() == "v2"
    assert (target / "metrics.json").read_text() == "mine" and (target / "named" / "keep.txt").read_text() == "mine"
    assert (target / "was_a_file").is_dir() and (target / "was_a_folder").read_text() == "v2"
    assert stat.S_IMODE((target / "w.txt").stat().st_mode) == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]

    def broken(folder):
        (folder / "w.txt").write_text("half")
        raise OSError("disk full")
    with pytest.raises(OSError, match="disk full"):
        merge_into_folder(target, broken)
    assert (target / "w.txt").read_text() == "v2" and sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="exists and is not a folder"):
        merge_into_folder(tmp_path / "file", write("v3"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "file"]


def test_serializer_write_failures_become_os_errors(tmp_path):
    """torch.save on a full disk raises RuntimeError ("unexpected pos ..."), safetensors SafetensorError: callers
    that stop with one line on an OSError (a full disk) got a traceback. Other errors pass unchanged."""
    from fastft.files import write_failures_as_os_errors

    full = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 62848 vs 62736")
    with pytest.raises(OSError, match=r"^RuntimeError: \[enforce fail.*unexpected pos 62848 vs 62736; [\d,.]+ MiB "
                                      f"free in {tmp_path}$") as info:
        with write_failures_as_os_errors(tmp_path):
            raise full
    assert info.value.__cause__ is full
    for other in (RuntimeError("a bug"), TypeError("cannot pickle"), OSError(13, "Permission denied")):
        with pytest.raises(type(other)) as info:
            with write_failures_as_os_errors(tmp_path):
                raise other
        assert info.value is other
