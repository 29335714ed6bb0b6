"""Run logs: a fresh (not resumed) run in a folder holding an earlier run's logs.jsonl starts it empty (the old
steps would read as this run's), each record is one JSON line; and the CPU peak memory the progress bar and
metrics.json show is the process's peak resident set in GiB (Linux's ru_maxrss is in KiB). A resumed run keeps the
lines up to its checkpoint's step and drops what is not a step's record (a torn line, a line another tool appended)."""
import json
import sys

import pytest
import torch

from fastft.apps.training.logs import RunLog, peak_memory_gib


def test_a_fresh_run_empties_an_earlier_runs_log(tmp_path):
    (tmp_path / "logs.jsonl").write_text(json.dumps({"step": 1, "loss": 9.0}) + "\n")
    log = RunLog(str(tmp_path), True)
    assert (tmp_path / "logs.jsonl").read_text() == ""
    log.write({"step": 1, "loss": 2.5})
    log.write({"step": 1, "eval": {"loss": 2.0}})
    log.close()
    lines = (tmp_path / "logs.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [{"step": 1, "loss": 2.5}, {"step": 1, "eval": {"loss": 2.0}}]


def test_a_disabled_log_leaves_the_folder_alone(tmp_path):
    (tmp_path / "logs.jsonl").write_text("kept\n")
    log = RunLog(str(tmp_path), False)
    log.write({"step": 1, "loss": 2.5})
    assert (tmp_path / "logs.jsonl").read_text() == "kept\n"


def test_a_resumed_run_drops_torn_and_foreign_lines(tmp_path):
    kept = [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.5}, {"step": 2, "eval": {"loss": 2.0}}]
    foreign = [{"note": "appended by a notebook"}, {"step": "2", "loss": 1.0}, [1, 2], {"step": 1.0, "loss": 4.0}]
    lines = [json.dumps(kept[0]), json.dumps(foreign[0]), json.dumps(kept[1]), json.dumps(foreign[1]),
             json.dumps(foreign[2]), json.dumps(foreign[3]), json.dumps(kept[2]), json.dumps({"step": 3, "loss": 2.0}),
             '{"step": 3, "lo']  # the killed run's step past the checkpoint, and its torn last line
    (tmp_path / "logs.jsonl").write_text("\n".join(lines))
    log = RunLog(str(tmp_path), True, resume_step=2, eval_steps=(2,))
    log.close()
    assert [json.loads(line) for line in (tmp_path / "logs.jsonl").read_text().splitlines()] == kept


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM of /proc/self/status")
def test_cpu_peak_memory_is_the_peak_rss_in_gib():
    with open("/proc/self/status") as f:
        hwm_kib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    gib = peak_memory_gib(torch.device("cpu"))
    assert gib == pytest.approx(hwm_kib / 2**20, rel=0.1)
    assert gib > 0.05   # a process that imported torch holds well over 50 MiB
