"""Writing files and folders atomically: the one place fastft does it (adapters, checkpoints, NF4 models, reports,
study cells, the generated NF4 header). Standard library only, so every layer may use it.

A file is written to a temporary sibling, fsynced, given the mode the umask gives (mkstemp makes 0600), renamed
over the target, and its folder fsynced: a reader, a crash or a SIGKILL sees the old file or the new one, never
half of one. A folder (a saved model) is written whole into a temporary sibling and swapped in the same way; the
previous version is removed only once the new one is in place. An adapter save merges instead (`merge_into_folder`):
what it wrote replaces the entries of the same name, file by file, and the folder's other entries stay, as peft's
save_pretrained leaves them (other named adapters, a run's metrics).
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Union

Content = Union[str, bytes, Callable[[str], None]]


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_path(path: str | os.PathLike) -> None:
    """fsync a file or a folder (a folder's fsync makes the renames inside it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, content: Content) -> Path:
    """Write `content` to `path` atomically: text, bytes, or a callable `write(tmp_path)` that writes the file
    itself (safetensors, matplotlib). Creates the parent folder; returns the path."""
    if not (callable(content) or isinstance(content, (str, bytes, bytearray))):
        raise TypeError(f"atomic_write: content must be str, bytes or a callable, got {type(content).__name__}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=path.name)
    os.close(fd)
    try:
        if callable(content):
            content(tmp)
        elif isinstance(content, str):
            Path(tmp).write_text(content)
        else:
            Path(tmp).write_bytes(content)
        os.chmod(tmp, 0o666 & ~umask())
        fsync_path(tmp)  # on disk before the rename, so a crash never leaves an empty target
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_path(path.parent)
    return path


def finish_folder(folder: str | os.PathLike) -> None:
    """Every folder and file below `folder` (itself included) gets the mode the umask gives (mkdtemp makes 0700,
    mkstemp 0600) and is fsynced."""
    mask = umask()
    for root, _, files in os.walk(folder):
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~mask)
            fsync_path(os.path.join(root, name))
        os.chmod(root, 0o777 & ~mask)
        fsync_path(root)


def replace_folder(path: str | os.PathLike, write: Callable[[Path], object], *, what: str = "save") -> Path:
    """`write(tmp_folder)` fills a temporary sibling of `path`, which then takes `path`'s place. The previous
    version is moved aside and removed after the swap; one that cannot be removed is an error (`what` names the
    caller in it), never left behind silently. Returns `path`."""
    given, (path, tmp) = Path(path), _start_folder_save(path)
    old = path.with_name(f".{path.name}.old")
    if os.path.lexists(old):  # left by a save interrupted between its two renames
        if os.path.lexists(path):
            _remove(old)  # the new version made it into place; `old` is the one before it
        else:
            os.replace(old, path)  # the last complete version goes back first: a failed save must not lose it
    try:
        write(tmp)
        finish_folder(tmp)
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        fsync_path(path.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)  # only our own unfinished temporary folder
    try:
        _remove(old)
    except OSError as e:
        raise OSError(f"{what}: the new version is saved to {path}, but the previous one moved to {old} could not "
                      f"be removed ({e}); delete it by hand") from e
    return given


def merge_into_folder(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """`write(tmp_folder)` fills a temporary sibling of `path`; each file it wrote then replaces the one of the same
    name in `path` (atomically: a reader sees the old file or the new one), a folder it wrote is merged the same way
    (moved whole where `path` has none), and every other entry of `path` stays. Nothing moves unless `write`
    succeeds. Returns `path`."""
    given, (path, tmp) = Path(path), _start_folder_save(path)
    if os.path.lexists(path) and not path.is_dir():
        shutil.rmtree(tmp)
        raise NotADirectoryError(f"{given} exists and is not a folder; give a folder, or a path to create")
    try:
        write(tmp)
        finish_folder(tmp)
        if path.is_dir():
            _merge(tmp, path)
        else:
            os.replace(tmp, path)
            fsync_path(path.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)  # our own temporary folder, emptied by the merge or unfinished
    return given


def _start_folder_save(path: str | os.PathLike) -> tuple[Path, Path]:
    """The resolved target (Path(".") has no name to make a sibling of; a link's folder is the one saved into) and
    a fresh temporary sibling of it. The temporary siblings left by earlier saves of `path` that were killed
    (SIGKILL skips their cleanup) are removed first."""
    path = Path(path).resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{path.name}.tmp-"
    for stale in path.parent.iterdir():
        if stale.name.startswith(prefix):
            _remove(stale)
    return path, Path(tempfile.mkdtemp(prefix=prefix, dir=path.parent))


def _merge(src: Path, dst: Path) -> None:
    """Move every entry of folder `src` into folder `dst`: files replace files (os.replace, atomic), folders merge
    into folders, an entry of the other kind is removed first."""
    for entry in sorted(src.iterdir()):
        target = dst / entry.name
        if entry.is_dir() and target.is_dir():  # a link to a folder: into the folder, as peft writes through it
            _merge(entry, target)
            continue
        if os.path.lexists(target) and (entry.is_dir() or (target.is_dir() and not target.is_symlink())):
            _remove(target)  # os.replace moves a folder onto nothing, a file only onto a file
        os.replace(entry, target)
    fsync_path(dst)


def _remove(tree: Path) -> None:
    """Remove a file or folder, read-only subfolders included; errors are raised, not ignored."""
    def writable_then_retry(func, name, _exc):
        os.chmod(os.path.dirname(name), 0o700)
        func(name)

    if tree.is_dir() and not tree.is_symlink():
        shutil.rmtree(tree, onerror=writable_then_retry)  # onexc from 3.12 on
    elif tree.exists() or tree.is_symlink():
        tree.unlink()


def output_dir_problem(output_dir: str | os.PathLike, flag: str = "--output-dir") -> str | None:
    """Why `output_dir` cannot be made into a folder (one line naming `flag`), or None when it can: the path or
    the nearest of its parents that exists must be a folder we may write in (`fastft train`, `bench` and `study`
    check it before any run, not when the first file is written)."""
    for path in (Path(output_dir), *Path(output_dir).parents):
        if os.path.lexists(path):   # lexists: a dangling link is no folder either
            where = "" if path == Path(output_dir) else f" {path}"
            if not path.is_dir():
                return f"{flag} {output_dir}:{where} exists and is not a folder; give a folder, or a path to create"
            if not _can_write_in(path):
                return (f"{flag} {output_dir}: cannot create files in {path} (its permissions, or a read-only "
                        "file system); give a folder you can write to")
            return None
    return None


def _can_write_in(folder: Path) -> bool:
    """Whether a file can be created in `folder`: tried, since root passes os.access's permission check on a
    read-only file system or an immutable folder."""
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".fastft-write-test-"):
            return True
    except OSError:
        return False
