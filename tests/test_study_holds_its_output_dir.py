"""`fastft study` holds its --output-dir while it runs and draws the report, as `fastft train` does (audit round
16): a second study started there ran every cell again beside the first, and a plot's temporary a killed study left
stayed for good once the next plan no longer drew that plot (only a later write of the same plot swept it)."""
import pytest

from fastft.apps import cli
from fastft.apps.study import runner
from fastft.files import lock_folder

ARGS = ["study", "--quick", "--methods", "lora", "--no-progress"]


@pytest.fixture
def no_cells(monkeypatch):
    """The study without its model and data packages or cells: what the command does around them."""
    ran = []
    monkeypatch.setattr(runner, "check_inputs", lambda config: {})

    def run_study(config, progress=True, log=print):
        ran.append(config.output_dir)
        return {"config": {}, "tasks": {}, "cells": [{"status": "done"}]}

    monkeypatch.setattr(runner, "run_study", run_study)
    import fastft.apps.study.report as report
    monkeypatch.setattr(report, "write_report", lambda results, out: {"report": f"{out}/report.md"})
    return ran


def test_a_second_study_in_a_held_output_dir_is_refused_in_one_line(tmp_path, no_cells, capsys):
    held, problem = lock_folder(tmp_path, runner.LOCK_NAME, "fastft study run")
    assert problem is None
    try:
        with pytest.raises(SystemExit) as stop:
            cli.main([*ARGS, "--output-dir", str(tmp_path)])
    finally:
        held.close()
    err = capsys.readouterr().err
    assert stop.value.code == 2 and no_cells == []
    assert "is in use by another fastft study run" in err and "Traceback" not in err
    assert cli.main([*ARGS, "--output-dir", str(tmp_path)]) == 0  # released: the next study takes it
    assert no_cells == [str(tmp_path)]


def test_a_killed_studys_temporaries_are_removed_when_the_next_one_starts(tmp_path, no_cells):
    (tmp_path / "plots").mkdir()
    (tmp_path / "cells").mkdir()
    dead = "0badc0de-4000000-1"  # host-pid-start of no live writer
    stale = [tmp_path / "plots" / f".tasks_old.png.tmp-{dead}-abcd1234.png",
             tmp_path / "cells" / f".c.json.tmp-{dead}-abcd1234.json",
             tmp_path / f".results.json.tmp-{dead}-x1y2z3w4.json"]
    for path in stale:
        path.write_text("half")
    kept = tmp_path / "plots" / "tasks_smollm2.png"
    kept.write_text("a plot")
    assert cli.main([*ARGS, "--output-dir", str(tmp_path)]) == 0
    assert [p.exists() for p in stale] == [False] * 3 and kept.read_text() == "a plot"
