"""Writing files atomically: the one helper every writer in fastft uses (checkpoints, results, plots).

The content goes to a temporary file in the target's folder, then `os.replace` moves it over the target, so
a reader (or a crash) never sees a half-written file.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable, Union

Content = Union[str, bytes, Callable[[str], None]]


def atomic_write(path: str | os.PathLike, content: Content) -> Path:
    """Write `content` to `path` atomically: text, bytes, or a callable `write(tmp_path)` that writes the file
    itself (safetensors, matplotlib). Creates the parent folder; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=path.name)
    os.close(fd)
    try:
        if callable(content):
            content(tmp)
        elif isinstance(content, (bytes, bytearray)):
            Path(tmp).write_bytes(content)
        elif isinstance(content, str):
            Path(tmp).write_text(content)
        else:
            raise TypeError(f"atomic_write: content must be str, bytes or a callable, got {type(content).__name__}")
        with open(tmp, "rb") as f:  # on disk before the rename, so a crash never leaves an empty target
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path
