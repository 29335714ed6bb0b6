"""fastft.files promises a crash sees the old file or the new one: `atomic_write` fsyncs the temporary before it is
renamed over the target (else a power cut can publish an empty file) and the folder after (else the rename itself can
be lost); the other files tests check contents and modes, which a missing fsync does not change. And the temporaries
of killed writes are told apart from live ones: another host's may still be written (a shared file system) and
stays, a writer's start time is the one /proc/PID/stat gives (field 22, clock ticks since boot), and a user's file
named like a temporary, but with an extension its target does not have, is not one."""
import os
import subprocess
import sys
import time

import pytest

from fastft import files
from fastft.files import atomic_write


def test_atomic_write_fsyncs_the_file_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    events = []
    fsync_path, replace = files.fsync_path, os.replace
    monkeypatch.setattr(files, "fsync_path", lambda p: (events.append(("fsync", os.fspath(p))), fsync_path(p))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", os.fspath(a), os.fspath(b))),
                                                     replace(a, b))[1])
    target = tmp_path / "report.json"
    atomic_write(target, "{}")
    renames = [e for e in events if e[0] == "replace"]
    assert len(renames) == 1 and renames[0][2] == str(target)
    tmp, at = renames[0][1], events.index(renames[0])
    assert ("fsync", tmp) in events[:at], events        # the content is on disk before it is published
    assert ("fsync", str(tmp_path)) in events[at:], events  # and the rename is made durable after
    assert target.read_text() == "{}"


def test_another_hosts_temporary_is_left_alone(tmp_path):
    host, pid, *start = files._owner().split("-")
    other = f"{int(host, 16) ^ 0xFFFFFFFF:08x}"              # any host id but this one
    assert other != host
    dead_pid = 2**22 + 17                                   # above Linux's pid_max: no such process here
    foreign = tmp_path / f".model.tmp-{other}-{dead_pid}-1-abcd_123"
    local_dead = tmp_path / f".model.tmp-{host}-{dead_pid}-1-efgh_456"
    foreign.mkdir()
    local_dead.mkdir()
    assert files.remove_stale_temporaries(tmp_path / "model") == [local_dead]
    assert [p.name for p in tmp_path.iterdir()] == [foreign.name]


def test_a_look_alike_whose_extension_is_not_its_targets_is_the_users(tmp_path):
    ours = tmp_path / ".notes.txt.tmp-0123abcd-4242-abcd1234.txt"  # a killed write of notes.txt
    theirs = tmp_path / ".notes.tmp-0123abcd-4242-backup01.txt"    # `notes` has no extension: not fastft's naming
    ours.write_text("partial")
    theirs.write_text("a user's backup")
    assert files._temporary_of(theirs.name) is None
    assert files._temporary_of(ours.name)["target"] == "notes.txt"
    assert files.remove_temporaries_in(tmp_path) == [ours]   # what `fastft train` runs once it holds the lock
    assert theirs.read_text() == "a user's backup"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_start_time_is_the_processes_start_in_clock_ticks_since_boot():
    ticks = os.sysconf("SC_CLK_TCK")
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])             # seconds since boot, read right after the start
        start = files._start_time(child.pid)
        assert start is not None and abs(start / ticks - uptime) < 10, (start, uptime)
        time.sleep(0.05)
        assert files._start_time(child.pid) == start        # a start time, not a counter that moves
        assert files._start_time(os.getpid()) <= start      # this process started before its child
    finally:
        child.kill()
        child.wait()
    assert files._start_time(child.pid) is None
