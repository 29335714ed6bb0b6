"""`fastft study --quick` itself, as a user runs it (issue 11: the quick study runs in CI): the report, plots
and raw JSON are written, and every method in it beats the majority class on at least one task.
About 2 minutes on a 2-core CPU."""
import glob
import json
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_quick_study_writes_its_report_and_every_method_beats_the_majority(tmp_path):
    run = subprocess.run([sys.executable, "-m", "fastft.apps.cli", "study", "--quick", "--output-dir", str(tmp_path)],
                         capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, run.stderr[-3000:]
    report = (tmp_path / "report.md").read_text()
    assert "## Headline" in report and "fastft against peft" in report
    plots = glob.glob(str(tmp_path / "plots" / "*.png"))
    assert plots and all(open(p, "rb").read(8) == b"\x89PNG\r\n\x1a\n" for p in plots)
    results = json.loads((tmp_path / "results.json").read_text())
    cells = [json.loads(open(f).read()) for f in glob.glob(str(tmp_path / "cells" / "*.json"))]
    assert cells and all(c["status"] == "done" for c in cells), [c["key"] for c in cells if c["status"] != "done"]
    majority = {name: task["majority"] for name, task in results["tasks"].items()}
    for method in {(c["method"], c["implementation"]) for c in cells}:
        beats = [c["task"] for c in cells if (c["method"], c["implementation"]) == method
                 and c["test_metric"] > majority[c["task"]][c["metric"]]]
        assert beats, f"{method} does not beat the majority class on any quick task"
