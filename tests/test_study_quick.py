"""`fastft study --quick` as a user runs it (issue 11: the quick study runs in CI), killed and rerun: started in a
subprocess, SIGKILLed once its first cell file exists, then rerun into the same output directory. The rerun reads
the finished cell back (same run_id, counted in results.json's resumed_cells) instead of training it again and
runs the rest; then every planned cell is done with sane numbers (the quick config's test/dev sizes, trainable
parameters, throughput, memory), the report, plots and raw JSON are written, and every method and implementation
beats the majority class on at least one task (LoRA and full fine-tuning on SUBJ by 5 points).
One real study serves all of this: about 2 to 3 minutes on a 2-core CPU."""
import glob
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from fastft.apps.study.runner import plan, quick_config

QUICK = [sys.executable, "-m", "fastft.apps.cli", "study", "--quick", "--no-progress", "--output-dir"]


def _cell_files(cells_dir):
    return {p.name: json.loads(p.read_text()) for p in cells_dir.glob("*.json") if not p.name.startswith(".")}


def _start_and_kill_after_first_cell(out, log):
    """Start the quick study; SIGKILL it as soon as a cell file exists. Returns (exit code before the kill, or None
    while it still ran; the cell files present then)."""
    with open(log, "wb") as sink:  # a file, not a pipe: an unread pipe could fill and stall the study
        proc = subprocess.Popen([*QUICK, str(out)], stdout=sink, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and proc.poll() is None:
            if (out / "cells").is_dir() and _cell_files(out / "cells"):
                break
            time.sleep(0.1)
        first_exit = proc.poll()
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    return first_exit, _cell_files(out / "cells")


@pytest.mark.slow
def test_quick_study_killed_and_rerun_resumes_and_every_method_beats_the_majority(tmp_path):
    out = tmp_path / "study"
    first_exit, finished = _start_and_kill_after_first_cell(out, tmp_path / "killed.log")
    assert first_exit is None, f"the study ended before it could be killed: {(tmp_path / 'killed.log').read_text()}"
    assert len(finished) == 1, sorted(finished)

    rerun = subprocess.run([*QUICK, str(out)], capture_output=True, text=True, timeout=1200)
    assert rerun.returncode == 0, rerun.stderr[-3000:]

    # the finished cell was read back, not trained again; every other cell ran
    name, before = next(iter(finished.items()))
    after = json.loads((out / "cells" / name).read_text())
    assert after["status"] == "done" and after["run_id"] == before["run_id"]
    results = json.loads((out / "results.json").read_text())
    assert results["resumed_cells"] == 1
    config = quick_config()
    planned = sorted(spec.key for spec, _ in plan(config))
    assert sorted(c["key"] for c in results["cells"]) == planned
    cells = list(_cell_files(out / "cells").values())
    assert sorted(c["key"] for c in cells) == planned
    assert all(c["status"] == "done" for c in cells), [c["key"] for c in cells if c["status"] != "done"]

    report = (out / "report.md").read_text()
    assert "## Headline" in report and "fastft against peft" in report
    plots = glob.glob(str(out / "plots" / "*.png"))
    assert len(plots) == 3 and all(open(p, "rb").read(8) == b"\x89PNG\r\n\x1a\n" for p in plots)

    for c in cells:
        assert c["test_examples"] == config.max_test and c["dev_examples"] == config.max_dev, c["key"]
        assert c["trainable_parameters"] > 0 and c["tokens_per_second"] > 0 and c["peak_memory_gib"] > 0, c["key"]
    majority = {name: task["majority"] for name, task in results["tasks"].items()}
    for method in {(c["method"], c["implementation"]) for c in cells}:
        beats = [c["task"] for c in cells if (c["method"], c["implementation"]) == method
                 and c["test_metric"] > majority[c["task"]][c["metric"]]]
        assert beats, f"{method} does not beat the majority class on any quick task"
    for c in cells:  # real training, 16 steps: well clear of always predicting one class on SUBJ
        if c["task"] == "subj" and c["method"] in ("lora", "full") and c["implementation"] == "fastft":
            assert c["test_accuracy"] > majority["subj"]["accuracy"] + 0.05, (c["key"], c["test_accuracy"])
