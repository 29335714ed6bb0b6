"""`python -m fastft.apps.study.report results.json [OUT_DIR]` draws report.md and the plots again from results.json
alone (it did nothing: the module had no main), with one-line errors (exit 2) for a missing or foreign file; the
cost table says its peak memory is the largest over tasks and seeds, not a mean as its other columns."""
import json
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest

from fastft.apps.study import report
from fastft.apps.study.runner import StudyConfig
from tests.test_study import _cell, _tasks_info

REPO = Path(__file__).resolve().parents[1]


def _results(tmp_path) -> Path:
    cells = [_cell("minilm", "subj", "lora", "fastft", 0, 0.9, 700_000, 900.0),
             _cell("minilm", "subj", "full", "fastft", 0, 0.85, 22_700_000, 600.0)]
    results = {"tasks": _tasks_info(["subj"]), "cells": cells, "config": asdict(StudyConfig(seeds=1)),
               "environment": {"device_name": "cpu"}}
    path = tmp_path / "study" / "results.json"
    path.parent.mkdir()
    path.write_text(json.dumps(results))
    return path


def test_the_report_is_drawn_again_from_results_json(tmp_path):
    source = _results(tmp_path)
    done = subprocess.run([sys.executable, "-m", "fastft.apps.study.report", str(source)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "RuntimeWarning" not in done.stderr, done.stderr
    text = (source.parent / "report.md").read_text()
    assert "| lora | 90.0 | 90.0 |" in text
    assert "Cost (means over tasks and seeds; peak memory: the largest):" in text
    assert (source.parent / "plots" / "score_vs_params.png").is_file()
    elsewhere = tmp_path / "elsewhere"
    assert report.main([str(source), str(elsewhere)]) == 0
    assert (elsewhere / "report.md").read_text() == text


def test_its_errors_are_one_line(tmp_path, capsys):
    stray = tmp_path / "other.json"
    needs = "not a fastft study results file (it needs its config, tasks, cells)"
    for payload, said in (([1, 2], needs), ({"config": {}, "cells": []}, needs),  # a field missing: named first
                          ({"config": {}, "tasks": {}, "cells": [{}]}, "not a fastft study results file (KeyError"),
                          ({"config": {}, "tasks": {}, "cells": [1]}, "not a fastft study results file (TypeError")):
        stray.write_text(json.dumps(payload))
        for argv, about in (([str(stray)], said), ([str(tmp_path / "missing.json")], "no such file")):
            with pytest.raises(SystemExit) as info:
                report.main(argv)
            assert info.value.code == 2
            last = capsys.readouterr().err.strip().splitlines()[-1]
            assert last.startswith(f"python -m fastft.apps.study.report: error: {argv[0]}: {about}"), last
