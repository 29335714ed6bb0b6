"""Which code produced a result: the commit of the checkout fastft runs from. The study and `fastft bench` record
it, and a resumed run refuses (bench) or reruns (study) what another commit measured: fastft's version string
does not change between commits."""
from __future__ import annotations

import functools
import subprocess
from pathlib import Path


@functools.cache
def git_commit() -> str | None:
    """HEAD of the checkout fastft runs from; None for an installed package (or without git)."""
    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():
        return None
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    commit = out.stdout.strip()
    return commit if out.returncode == 0 and commit else None
