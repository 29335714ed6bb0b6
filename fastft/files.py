"""Writing files and folders atomically: the one place fastft does it (adapters, checkpoints, NF4 models, reports,
study cells, the generated NF4 header). Standard library only, so every layer may use it.

A file is written to a temporary sibling, fsynced, given the mode the umask gives (mkstemp makes 0600), renamed
over the target, and its folder fsynced: a reader, a crash or a SIGKILL sees the old file or the new one, never
half of one. A folder (a saved model, an adapter) is written whole into a temporary sibling and swapped in as a
whole: in one step where the system can exchange two paths (Linux's renameat2), else by moving the previous version
aside first (`.NAME.old`, put back by the next save, or by `recover_folder`, when a kill lands between the two
renames); the previous version is removed only once the new one is in place. An adapter save keeps the folder's other
entries (`merge_into_folder`: other named adapters, a run's metrics), as peft's save_pretrained leaves them.

Temporary siblings are named `.NAME.tmp-OWNER-XXXXXXXX` (OWNER: this host and process): the next save of NAME removes
those of writers that are gone (SIGKILL skips their cleanup), never one a live process is still writing.
"""
from __future__ import annotations

import ctypes
import errno
import os
import re
import shutil
import socket
import tempfile
import zlib
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
    itself (safetensors, matplotlib; the temporary file keeps `path`'s extension). Creates the parent folder; returns
    the path. Temporaries that killed earlier writes of `path` left are removed first."""
    if not (callable(content) or isinstance(content, (str, bytes, bytearray))):
        raise TypeError(f"atomic_write: content must be str, bytes or a callable, got {type(content).__name__}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_temporary_prefix(path), suffix=path.suffix)
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
    """`write(tmp_folder)` fills a temporary sibling of `path`, which then takes `path`'s place as a whole (nothing of
    the previous version stays). The previous version is removed after the swap; one that cannot be removed is an
    error (`what` names the caller in it), never left behind silently. Returns `path`."""
    return _save_folder(path, write, keep_others=False, what=what)


def merge_into_folder(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """`write(tmp_folder)` fills a temporary sibling of `path`; the entries of `path` it did not write (a folder it
    wrote is merged the same way) are added to it, hard-linked (copied where the file system has no links), and the
    result takes `path`'s place as a whole, as `replace_folder` does: a reader sees the old folder or the new one,
    never a mix of two saves. Nothing moves unless `write` succeeds. Returns `path`."""
    return _save_folder(path, write, keep_others=True, what="save")


def recover_folder(path: str | os.PathLike) -> None:
    """Finish what a folder save killed between its two renames left (only where no exchange in one step is
    possible): `path` missing and its previous version in `.NAME.old` puts that back; both present means the new
    version made it, and `.NAME.old` goes."""
    path = Path(path)
    old = _old_version(path)
    if os.path.lexists(old):
        if os.path.lexists(path):
            _remove(old)
        else:
            os.replace(old, path)
            fsync_path(path.parent)


def _save_folder(path, write, *, keep_others: bool, what: str) -> Path:
    given, (path, tmp) = Path(path), _start_folder_save(path)
    if keep_others and os.path.lexists(path) and not path.is_dir():
        shutil.rmtree(tmp)
        raise NotADirectoryError(f"{given} exists and is not a folder; give a folder, or a path to create")
    try:
        recover_folder(path)  # the last complete version goes back first: a failed save must not lose it
        write(tmp)
        finish_folder(tmp)
        if keep_others and path.is_dir():
            _link_missing(path, tmp)
        old = _swap_in(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)  # only our own unfinished temporary folder
    if old is not None:
        try:
            _remove(old)
        except OSError as e:
            raise OSError(f"{what}: the new version is saved to {path}, but the previous one moved to {old} could not "
                          f"be removed ({e}); delete it by hand") from e
    return given


def _old_version(path: Path) -> Path:
    return path.with_name(f".{path.name}.old")


def _swap_in(tmp: Path, path: Path) -> Path | None:
    """Put folder `tmp` at `path`; returns where the previous version now is (None: there was none)."""
    if not os.path.lexists(path):
        os.replace(tmp, path)
        fsync_path(path.parent)
        return None
    old = _old_version(path)
    if _exchange(tmp, path):  # one step: the previous version is now at tmp's name
        os.replace(tmp, old)
    else:
        os.replace(path, old)  # a kill from here to the next rename: `recover_folder` puts `old` back
        os.replace(tmp, path)
    fsync_path(path.parent)
    return old


_RENAME_EXCHANGE, _AT_FDCWD = 2, -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux renameat2 RENAME_EXCHANGE); False where the system or the file
    system cannot (the caller then renames twice)."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError, TypeError):  # not Linux (glibc 2.28+ / musl)
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):  # EINVAL: a file system without exchange
        return False
    raise OSError(code, os.strerror(code), str(b))


def _link_missing(src: Path, dst: Path) -> None:
    """Add to folder `dst` every entry of folder `src` it lacks (folders in both: merged the same way)."""
    for entry in sorted(src.iterdir()):
        target = dst / entry.name
        if not os.path.lexists(target):
            _link_tree(entry, target)
        elif entry.is_dir() and target.is_dir() and not target.is_symlink():
            _link_missing(entry, target)
    fsync_path(dst)


def _link_tree(src: Path, dst: Path) -> None:
    """`src` at `dst` without copying file contents where a hard link can be made (the saved files are never
    written in place, only replaced, so sharing them with the previous version is safe)."""
    if src.is_symlink():
        os.symlink(os.readlink(src), dst)
    elif src.is_dir():
        dst.mkdir()
        for entry in sorted(src.iterdir()):
            _link_tree(entry, dst / entry.name)
        fsync_path(dst)
    else:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)
            fsync_path(dst)


def _start_folder_save(path: str | os.PathLike) -> tuple[Path, Path]:
    """The resolved target (Path(".") has no name to make a sibling of; a link's folder is the one saved into) and
    a fresh temporary sibling of it. The temporary siblings left by earlier saves of `path` that were killed
    (SIGKILL skips their cleanup) are removed first."""
    path = Path(path).resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    return path, Path(tempfile.mkdtemp(prefix=_temporary_prefix(path), dir=path.parent))


def _owner() -> str:
    """This process on this host, as temporary names carry it."""
    return f"{zlib.crc32(socket.gethostname().encode()):08x}-{os.getpid()}"


def _temporary_prefix(path: Path) -> str:
    return f".{path.name}.tmp-{_owner()}-"


def remove_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Remove the temporary siblings of `path` (files or folders) that earlier writes of it left when they were
    killed: those whose writer was a process of this host that has ended, and unowned ones of earlier fastft
    versions (`.NAME.tmp-XXXXXXXX` folders). One a live process, or another host, may still be writing stays.
    Returns what was removed."""
    path = Path(path)
    prefix, host = f".{path.name}.tmp-", _owner().split("-")[0]
    removed = []
    for stale in path.parent.iterdir() if path.parent.is_dir() else ():
        if not stale.name.startswith(prefix) or _being_written(stale.name[len(prefix):], host, other_hosts=True):
            continue
        _remove(stale)
        removed.append(stale)
    return removed


_TEMPORARY = re.compile(r"\.(.+\.)?tmp-(?P<owner>.+)")  # `.NAME.tmp-…`; `.tmp-XXXXXXXXNAME` of earlier versions


def remove_temporaries_in(folder: str | os.PathLike) -> list[Path]:
    """Remove every temporary file or folder of fastft's naming directly in `folder`, but those a live process of
    this host is writing: for a folder no other host writes to now (one a run holds a lock on). Returns them."""
    host, removed = _owner().split("-")[0], []
    for stale in Path(folder).iterdir():
        match = _TEMPORARY.fullmatch(stale.name)
        if match and not _being_written(match["owner"], host, other_hosts=False):
            _remove(stale)
            removed.append(stale)
    return removed


def _being_written(owner: str, host: str, other_hosts: bool) -> bool:
    """Whether the writer a temporary's name after `.tmp-` names (host-pid-random) may still be writing it: a live
    process of this host, or (other_hosts) any process of another host. Names without an owner (earlier versions'):
    no."""
    parts = owner.split("-", 2)  # host, pid, random part (+ extension)
    if len(parts) != 3 or not parts[1].isdigit():
        return False
    return other_hosts if parts[0] != host else _alive(int(parts[1]))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


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
