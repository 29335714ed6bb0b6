"""fastft.files, the one atomic writer of files and folders: old or new content, never half; modes as the umask
gives them; no temporaries left behind, whatever fails."""
import os
import stat

import pytest

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
