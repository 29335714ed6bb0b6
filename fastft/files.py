"""Writing files and folders atomically: the one place fastft does it (adapters, checkpoints, NF4 models, reports,
study cells, the generated NF4 header). Standard library only, so every layer may use it.

A file is written to a temporary sibling, fsynced, given the mode the umask gives (mkstemp makes 0600), renamed
over the target, and its folder fsynced: a reader, a crash or a SIGKILL sees the old file or the new one, never
half of one. A folder (a saved model, an adapter) is written whole into a temporary sibling and swapped in as a
whole: in one step where the system can exchange two paths (Linux's renameat2), else by moving the previous version
aside first (`.NAME.old`, put back by the next save, or by `recover_folder`, when a kill lands between the two
renames); the previous version is removed only once the new one is in place. An adapter save keeps the folder's other
entries (`merge_into_folder`: other named adapters, a run's metrics), as peft's save_pretrained leaves them.

Temporary siblings are named `.NAME.tmp-OWNER-XXXXXXXX` (OWNER: this host, process and its start time): the next save
of NAME removes those of writers that are gone (SIGKILL skips their cleanup), never one a live process is still
writing; a process given a dead writer's PID later (a restarted container's) is told from it by its start time.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import fnmatch
import functools
import os
import re
import shutil
import socket
import stat
import tempfile
import threading
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
    given = path = Path(path)
    if path.is_symlink():  # a link's file is written (as open() writes through it), the link stays
        path = Path(os.path.realpath(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    with _WRITING_LOCK:  # made and held in one step: another thread's sweep never sees it unheld
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_temporary_prefix(path),
                                   suffix=Path(_short(path.name)).suffix)
        _WRITING.add(tmp)
    try:
        os.close(fd)
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
    finally:
        _WRITING.discard(tmp)
    fsync_path(path.parent)
    return given


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


def merge_into_folder(path: str | os.PathLike, write: Callable[[Path], object], *,
                      alternatives: tuple[tuple[str, ...], ...] = ()) -> Path:
    """`write(tmp_folder)` fills a temporary sibling of `path`; the entries of `path` it did not write (a folder it
    wrote is merged the same way) are added to it, hard-linked (copied where the file system has no links), and the
    result takes `path`'s place as a whole, as `replace_folder` does: a reader sees the old folder or the new one,
    never a mix of two saves. A link to a folder in `path` stays a link where `write` wrote a folder of its name: that
    folder is written into the link's, file by file (each replaced atomically, the others kept), as peft's
    save_pretrained writes through the link. Nothing moves unless `write` succeeds. Returns `path`.
    alternatives: groups of file-name patterns (fnmatch) for the files of one save in its possible formats
    (adapter_model.safetensors / .bin; a model's one file / shards + index): where `write` wrote a file of a group,
    the old folder's files of that group are not kept (a loader preferring a stale one would read it)."""
    return _save_folder(path, write, keep_others=True, what="save", alternatives=alternatives)


@contextlib.contextmanager
def one_version(folder: str | os.PathLike, *, attempts: int = 20):
    """The files of `folder` as one save wrote them, for a reader that opens them one after another while another
    process may save the folder again (reading by path, a config of one save was read with the weights of the next):
    yields a private folder of links to them, removed afterwards. Each file is opened through a handle on the folder
    itself, all before the folder is known to be still the one at that path (a save swaps a whole new folder in,
    and removes the previous one only after); the links lead to those open files (Linux's /proc/self/fd), so the
    previous version's removal while they are read takes nothing away. Files only, not subfolders. Where there is
    no /proc, or for anything but a folder, `folder` itself is yielded."""
    folder = Path(folder)
    if not (folder.is_dir() and os.path.isdir("/proc/self/fd")):
        yield folder
        return
    for _ in range(attempts):
        opened = _open_version(folder)
        if opened is None:  # saved again meanwhile: take the new version
            continue
        view = Path(tempfile.mkdtemp(prefix="fastft-read-"))
        try:
            for name, fd in opened.items():
                os.symlink(f"/proc/self/fd/{fd}", view / name)
            yield view
        finally:
            shutil.rmtree(view, ignore_errors=True)
            for fd in opened.values():
                os.close(fd)
        return
    raise OSError(errno.EBUSY, f"{folder} was saved again {attempts} times while it was being read; read it once "
                               "the saves stop")


def _open_version(folder: Path) -> dict[str, int] | None:
    """{name: an open descriptor} of every file in `folder`, or None when `folder` was replaced meanwhile."""
    try:
        folder_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except FileNotFoundError:  # between a two-rename swap's renames
        return None
    opened: dict[str, int] = {}
    try:
        for name in os.listdir(folder_fd):
            try:  # (a link in the folder: its file; a FIFO is not opened: that would wait for a writer)
                if not stat.S_ISREG(os.stat(name, dir_fd=folder_fd).st_mode):
                    continue
                fd = os.open(name, os.O_RDONLY, dir_fd=folder_fd)
            except FileNotFoundError:  # a dangling link, or a version being removed (told apart below)
                continue
            if stat.S_ISREG(os.fstat(fd).st_mode):
                opened[name] = fd
            else:
                os.close(fd)
        now, taken = os.stat(folder), os.fstat(folder_fd)
        if (now.st_ino, now.st_dev) == (taken.st_ino, taken.st_dev):
            return opened
    except FileNotFoundError:
        pass
    finally:
        os.close(folder_fd)
    for fd in opened.values():
        os.close(fd)
    return None


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


def _save_folder(path, write, *, keep_others: bool, what: str, alternatives: tuple[tuple[str, ...], ...] = ()) -> Path:
    cwd = Path.cwd().resolve()
    old, swapping = None, False
    given, (path, tmp) = Path(path), _start_folder_save(path)
    try:  # tmp's name is held until the previous version moved there is removed: another thread's sweep leaves it
        try:  # (everything after the temporary's creation: an interrupt anywhere runs the cleanup below)
            if os.path.lexists(path) and not path.is_dir():  # (a file would be swapped out and deleted)
                raise NotADirectoryError(f"{given} exists and is not a folder; give a folder, or a path to create")
            if path.is_dir() and not _can_write_in(path):  # a folder made read-only: its save fails in peft too
                raise PermissionError(f"{given} is a folder this process may not write into (read-only); make it "
                                      "writable (chmod u+w) or save to another folder")
            recover_folder(path)  # the last complete version goes back first: a failed save must not lose it
            write(tmp)
            finish_folder(tmp)
            if keep_others and path.is_dir():
                _write_through_links(path, tmp)
                _link_missing(path, tmp, alternatives)
            swapping = True  # tmp is complete from here on
            old = _swap_in(tmp, path)
        finally:
            if swapping and old is None and not os.path.lexists(path) and tmp.exists():
                try:  # interrupted between a two-rename swap's renames: the new version goes in
                    os.replace(tmp, path)
                except BaseException:  # (it cannot: `recover_folder` puts the previous one back later)
                    pass
            if old != tmp and tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)  # only our own unfinished temporary folder
        if cwd == path or path in cwd.parents:  # the process stood in the folder replaced: into its new version
            with contextlib.suppress(OSError):
                os.chdir(cwd)
        if old is not None:
            try:
                _remove(old)
            except OSError as e:
                raise OSError(f"{what}: the new version is saved to {path}, but the previous one moved to {old} "
                              f"could not be removed ({e}); delete it by hand") from e
    finally:
        _WRITING.discard(str(tmp))  # whatever is left at its name (an interrupted removal's) is stale from now on
    return given


def _old_version(path: Path) -> Path:
    return path.with_name(f".{_short(path.name)}.old")


def _short(name: str) -> str:
    """`name` as temporary names carry it: a long one (past 160 bytes: a temporary adds ~45 to it, and a name may have
    255), or one with an extension past 16 bytes (a file's temporary repeats it), cut to its first 100 bytes, a
    checksum of the whole and its extension (if at most 16 bytes)."""
    raw = os.fsencode(name)
    short_suffix = len(os.fsencode(Path(name).suffix)) <= 16
    if len(raw) <= 160 and short_suffix:
        return name
    suffix = Path(name).suffix if short_suffix else ""
    return f"{raw[:100].decode('utf-8', 'ignore')}~{zlib.crc32(raw):08x}{suffix}"


def _swap_in(tmp: Path, path: Path) -> Path | None:
    """Put folder `tmp` at `path`; returns where the previous version now is (None: there was none): `tmp` itself
    after an exchange (this writer's own temporary name, so writers saving the same folder at once never meet at one
    name), else `.NAME.old`."""
    if not os.path.lexists(path):
        try:
            os.replace(tmp, path)
            fsync_path(path.parent)
            return None
        except OSError as e:  # another writer's first save made `path` meanwhile: swap with it as below
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
    if _exchange(tmp, path):  # one step: the previous version is now at tmp's name
        fsync_path(path.parent)
        return tmp
    old = _old_version(path)
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


def _write_through_links(folder: Path, tmp: Path) -> None:
    """Where `folder` (or a subfolder of it `tmp` also has) holds a link to a folder and the save wrote a folder of that
    name, the save's folder goes into the link's folder (as peft's save_pretrained writes through the link: the user
    keeps that adapter elsewhere), and the link takes its place in `tmp`."""
    for entry in sorted(folder.iterdir()):
        written = tmp / entry.name
        if not (written.is_dir() and not written.is_symlink() and entry.is_dir()):
            continue
        if entry.is_symlink():
            _merge_through(written, entry)
            shutil.rmtree(written)
            os.symlink(os.readlink(entry), written)
        else:
            _write_through_links(entry, written)


def _merge_through(src: Path, dst: Path) -> None:
    """Copy the tree `src` into folder `dst` (a link's, maybe on another file system): each file replaces the one of
    its name atomically (`atomic_write`), a folder merges into a folder, an entry of the other kind is removed first,
    and every other entry of `dst` stays."""
    for entry in sorted(src.iterdir()):
        target = dst / entry.name
        if entry.is_dir():
            if os.path.lexists(target) and not target.is_dir():
                _remove(target)
            target.mkdir(exist_ok=True)
            _merge_through(entry, target)
        else:
            if target.is_dir() and not target.is_symlink():
                _remove(target)
            atomic_write(target, functools.partial(shutil.copyfile, entry))
    fsync_path(dst)


def _link_missing(src: Path, dst: Path, alternatives: tuple[tuple[str, ...], ...] = ()) -> None:
    """Add to folder `dst` every entry of folder `src` it lacks (folders in both: merged the same way), but not a
    file one of whose `alternatives` `dst` holds, nor a temporary of fastft's naming (another writer's write probe,
    there for a moment, or one an interrupted probe left: never part of a save)."""
    for entry in sorted(src.iterdir()):
        if _temporary_of(entry.name) is not None:
            continue
        target = dst / entry.name
        superseded = any(_matches(entry.name, group) and any(_matches(name, group) for name in os.listdir(dst))
                         for group in alternatives)
        if not os.path.lexists(target) and not superseded:
            _link_tree(entry, target)
        elif entry.is_dir() and target.is_dir() and not target.is_symlink():
            _link_missing(entry, target, alternatives)
    fsync_path(dst)


def _matches(name: str, patterns) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


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


# The temporaries this process is writing now: one of this process's own not among them is stale too (an interrupted
# save's: KeyboardInterrupt), and the next save removes it, as it removes those of processes that ended.
_WRITING: set[str] = set()
_WRITING_LOCK = threading.Lock()


def temporary_sibling_folder(path: str | os.PathLike, *, held: bool = True) -> Path:
    """A fresh temporary folder beside `path`, named as fastft's temporaries are (the next call removes it if its
    writer was killed or interrupted), for a writer that puts it in place itself and then calls
    `release_temporary`; the stale ones of `path` are removed first. held=False: a folder only to delete (a
    version moved aside), stale from the start for every other call."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    with _WRITING_LOCK:  # made and held in one step: another thread's sweep never sees it unheld
        tmp = tempfile.mkdtemp(prefix=_temporary_prefix(path), dir=path.parent)
        if held:
            _WRITING.add(tmp)
    return Path(tmp)


def release_temporary(tmp: str | os.PathLike) -> None:
    """Remove a temporary_sibling_folder's folder (what is left at its name) and let its name go."""
    shutil.rmtree(tmp, ignore_errors=True)
    _WRITING.discard(str(tmp))


def _start_folder_save(path: str | os.PathLike) -> tuple[Path, Path]:
    """The resolved target (Path(".") has no name to make a sibling of; a link's folder is the one saved into) and
    a fresh temporary sibling of it. The temporary siblings left by earlier saves of `path` that were killed
    (SIGKILL skips their cleanup) are removed first."""
    if not os.fspath(path):  # Path("") is Path("."): the working directory, by accident
        raise ValueError("the folder to save to is an empty path; give a folder, e.g. 'out/adapter'")
    path = Path(path).resolve()
    try:
        return path, temporary_sibling_folder(path)
    except PermissionError as e:  # its error names the temporary folder, which the user never named
        raise PermissionError(e.errno, f"{path.parent} may not be written into (read-only?): a save of {path.name} "
                                       "writes its new version beside it first, then swaps it in") from None


def _owner() -> str:
    """This process on this host, as temporary names carry it: HOST-PID-START (START: the process's start time, so
    that a later process given the same PID, as a restarted container's are, is not taken for it), or HOST-PID where
    the start time cannot be read (not Linux)."""
    host, pid = f"{zlib.crc32(socket.gethostname().encode()):08x}", os.getpid()
    start = _start_time(pid)
    return f"{host}-{pid}" if start is None else f"{host}-{pid}-{start}"


def _start_time(pid: int) -> int | None:
    """When process `pid` started (Linux: /proc/PID/stat's field 22, clock ticks since boot); None where unknown
    (no such process, no /proc)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat[stat.rindex(b")") + 2:].split()  # after the command name, which may hold spaces: field 3 on
    return int(fields[22 - 3])


def _temporary_prefix(path: Path) -> str:
    return f".{_short(path.name)}.tmp-{_owner()}-"


# The names fastft's temporaries have: `.NAME.tmp-OWNER-XXXXXXXX[.EXT]` (OWNER: `_owner`; XXXXXXXX: mkstemp's or
# mkdtemp's 8 random characters; EXT: NAME's extension, files only), and earlier versions' `.NAME.tmp-XXXXXXXX`
# (a folder) and `.tmp-XXXXXXXXNAME` (a file). Nothing else, however like them: a user's `.notes.tmp-draft` stays.
_RANDOM = r"[a-z0-9_]{8}"
_TEMPORARY = re.compile(
    rf"\.(?P<target>.+)\.tmp-(?:(?P<host>[0-9a-f]{{8}})-(?P<pid>\d+)(?:-(?P<start>\d+))?-{_RANDOM}(?P<ext>\.[^.]*)?"
    rf"|{_RANDOM})"
    rf"|\.tmp-{_RANDOM}(?P<old_target>.+)")


def _temporary_of(name: str) -> re.Match | None:
    """The match of `name` against fastft's temporary names (its `target`, or `old_target` for an earlier version's
    file), None for any other name."""
    match = _TEMPORARY.fullmatch(name)
    if match is None or match["ext"] is not None and match["ext"] != Path(match["target"]).suffix:
        return None
    return match


def remove_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Remove the temporary siblings of `path` (files or folders) that earlier writes of it left when they were
    killed: those whose writer was a process of this host that has ended, and unowned ones of earlier fastft
    versions. One a live process, or another host, may still be writing stays. Returns what was removed."""
    path = Path(path)
    host, removed = _owner().split("-")[0], []
    for stale in path.parent.iterdir() if path.parent.is_dir() else ():
        match = _temporary_of(stale.name)
        if match is None or not {path.name, _short(path.name)} & {match["target"], match["old_target"]} \
                or _being_written(match, host, other_hosts=True) and not _abandoned_here(match, stale, host):
            continue
        _remove(stale)
        removed.append(stale)
    return removed


def _abandoned_here(match: re.Match, stale: Path, host: str) -> bool:
    """A temporary of this very process that no write of it holds now (an interrupted one's). This host's only: a
    process of another (a container on a shared volume) may have the same PID and start time."""
    if match["host"] != host or match["start"] is None or int(match["pid"]) != os.getpid() \
            or int(match["start"]) != _start_time(os.getpid()):
        return False
    with _WRITING_LOCK:
        return stale.name not in {os.path.basename(t) for t in _WRITING}


def remove_temporaries_in(folder: str | os.PathLike) -> list[Path]:
    """Remove every temporary file or folder of fastft's naming directly in `folder`, whoever wrote it: call only for
    a folder no process writes to now (one a `fastft train` run holds the lock of, before it writes). Returns them."""
    removed = []
    for stale in Path(folder).iterdir():
        if _temporary_of(stale.name) is not None:
            _remove(stale)
            removed.append(stale)
    return removed


def _being_written(match: re.Match, host: str, other_hosts: bool) -> bool:
    """Whether the writer a temporary's name names (`_temporary_of`'s match) may still be writing it: a live process
    of this host (the same PID and, where the name has it, the same start time), or (other_hosts) any process of
    another host. Names without an owner (earlier versions'): no."""
    if match["host"] is None:
        return False
    if match["host"] != host:
        return other_hosts
    return _alive(int(match["pid"]), None if match["start"] is None else int(match["start"]))


def _alive(pid: int, start: int | None) -> bool:
    """Whether process `pid` runs, and, given its `start` time, is the one that started then (not a later process
    given the same PID)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        pass
    if start is None:
        return True
    now = _start_time(pid)
    return now is None or now == start  # unknown (no /proc): it may be the writer


def _remove(tree: Path) -> None:
    """Remove a file or folder, read-only subfolders included; errors are raised, not ignored."""
    def writable_then_retry(func, name, _exc):
        os.chmod(os.path.dirname(name), 0o700)
        func(name)

    if tree.is_dir() and not tree.is_symlink():
        shutil.rmtree(tree, onerror=writable_then_retry)  # onexc from 3.12 on
    elif tree.exists() or tree.is_symlink():
        tree.unlink()


# what serializers raise instead of an OSError when a write fails (torch.save: RuntimeError from its zip writer;
# safetensors: SafetensorError): a full disk, a quota, an I/O error
_WRITE_FAILURE_TEXT = ("No space left on device", "os error 28", "Disk quota exceeded", "os error 122", "I/O error",
                       "unexpected pos", "failed writing file", "file write failed")


@contextlib.contextmanager
def write_failures_as_os_errors(folder: str | os.PathLike):
    """Re-raise a serializer's failure to write under `folder` (torch.save's "unexpected pos ...", safetensors' "I/O
    error: No space left on device") as an OSError naming the free space there, so that the callers' OSError handling
    (the one-line stop of a full disk) takes it as it takes the OSErrors of plain file writes."""
    try:
        yield
    except OSError:
        raise
    except Exception as e:
        if not any(text in str(e) for text in _WRITE_FAILURE_TEXT):
            raise
        try:
            free = f"; {shutil.disk_usage(folder).free / 2**20:,.1f} MiB free in {folder}"
        except OSError:
            free = ""
        raise OSError(f"{type(e).__name__}: {str(e).strip()}{free}") from e


def lock_folder(folder: str | os.PathLike, lock_name: str, who: str):
    """(the open lock file, None) when this process now holds `folder`/`lock_name` (an `fcntl.flock`, taken without
    waiting; the kernel drops it when the holder's process ends, however it ends, so a killed run never blocks the
    next), (None, why not) when another holder has it or it cannot be taken — never an exception (a caller's other
    processes may wait for the outcome). `who` names such a holder in the refusal ("fastft train run"). Close the
    file to release it."""
    import fcntl

    folder = Path(folder)
    path = folder / lock_name
    try:
        folder.mkdir(parents=True, exist_ok=True)
        lock = open(path, "a+")
    except OSError as e:
        return None, f"--output-dir {folder}: cannot create {path} ({e}); give a folder you can write to"
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "a process"
        lock.close()
        return None, (f"--output-dir {folder} is in use by another {who} ({holder} holds its {lock_name} until it "
                      "ends); wait for it to end, or choose another --output-dir")
    except OSError as e:  # a file system without locks
        lock.close()
        return None, f"--output-dir {folder}: cannot lock {path} ({e}); choose a folder on another file system"
    lock.seek(0)
    lock.truncate()
    lock.write(f"process {os.getpid()} on {socket.gethostname()}\n")
    lock.flush()
    return lock, None


def output_dir_problem(output_dir: str | os.PathLike, flag: str = "--output-dir") -> str | None:
    """Why `output_dir` cannot be made into a folder (one line naming `flag`), or None when it can: the path or
    the nearest of its parents that exists must be a folder we may write in (`fastft train`, `bench` and `study`
    check it before any run, not when the first file is written). An empty path (the current folder, which would
    take the run's files among whatever is there) is refused too."""
    if not str(output_dir).strip():
        return f"{flag} is empty; give a folder to write to (a new one, or one of an earlier run)"
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


def output_names_problem(output_dir: str | os.PathLike, files=(), folders=(), flag: str = "--output-dir") -> str | None:
    """Why a run cannot write its `files` and `folders` (names inside output_dir): one of them is there as the other
    kind (one line naming `flag`), or None. Checked before any run: the write failed only after the work was done."""
    for name, want_folder in [*((f, False) for f in files), *((f, True) for f in folders)]:
        path = Path(output_dir, name)
        if os.path.lexists(path) and path.is_dir() != want_folder:
            kind = "not a folder" if want_folder else "a folder"
            return (f"{flag} {output_dir}: {path} is {kind}, where the {name} {'folder' if want_folder else 'file'} "
                    f"goes; move it, or give another {flag}")
    return None


def _can_write_in(folder: Path) -> bool:
    """Whether a file can be created in `folder`: tried, since root passes os.access's permission check on a
    read-only file system or an immutable folder. The probe is a temporary of fastft's naming (target
    `fastft-write-test`): one a killed process left is removed by the next probe of the folder, and by a run's
    cleanup of its --output-dir (`remove_temporaries_in`)."""
    probe = folder / "fastft-write-test"
    with contextlib.suppress(OSError):  # (in a folder we may not write in, the probe below says so)
        remove_stale_temporaries(probe)
    try:
        fd, name = tempfile.mkstemp(dir=folder, prefix=_temporary_prefix(probe))
    except OSError:
        return False
    try:
        os.close(fd)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name)
    return True
