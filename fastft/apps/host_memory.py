"""The process's host memory, as the apps report it on the CPU: resident now, and its peak (RSS)."""
from __future__ import annotations

import os
import resource
import sys


def peak_rss_bytes() -> int:
    """The process's largest resident set so far (getrusage's ru_maxrss: KiB on Linux, bytes on macOS)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def rss_bytes() -> int:
    """The process's resident set now (Linux's /proc/self/statm); elsewhere its peak so far, the best the OS offers."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return peak_rss_bytes()
