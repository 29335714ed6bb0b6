"""`fastft bench` and `fastft study` refuse bad settings before any run (an --output-dir that is a file, a missing
--model, non-finite or non-positive rates, methods named twice), `fastft bench` exits non-zero when no run
measured anything, a study cell whose training loss became non-finite is "diverged" (no score, read back on
resume, shown as diverged in the report), and the study's tasks table describes the test rows the cells are
tested on. Fast: validation, the report writer, and the cell loop on a two-parameter stand-in model."""
import math
from dataclasses import asdict

import pytest
import torch

from fastft.apps import cli
from fastft.apps.bench.config import BenchConfig
from fastft.apps.study import cell as cell_module
from fastft.apps.study import runner as runner_module
from fastft.apps.study.cell import CellSettings, CellSpec, run_cell
from fastft.apps.study.report import write_report
from fastft.apps.study.runner import StudyConfig, _finished, write_json_atomic
from tests.test_study_review_fixes import _toy_task, stand_in_prepared

# one tiny fastft row: what an old build ran before failing late (kept small so a regression fails fast)
TINY = ["--shape", "tiny", "--methods", "lora", "--peers", "none", "--steps", "1", "--warmup", "1", "--seq-len", "8",
        "--batch-size", "1", "--formats", "json", "md"]


def _one_line_error(capsys, prefix: str) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(prefix), err
    return err


@pytest.fixture
def a_file(tmp_path):
    path = tmp_path / "results.txt"
    path.write_text("not a folder")
    return path


# --- bug 1: --output-dir naming an existing file ---------------------------------------------------------------

@pytest.mark.parametrize("below", [False, True])
def test_bench_refuses_an_output_dir_that_is_a_file_before_any_run(a_file, capsys, monkeypatch, below):
    from fastft.apps.bench import run

    monkeypatch.setattr(run, "run_one", lambda *a, **k: pytest.fail("a run started before the check"))
    target = a_file / "sub" if below else a_file
    assert cli.main(["bench", *TINY, "--output-dir", str(target)]) == 2
    err = _one_line_error(capsys, "fastft bench: error: --output-dir")
    assert "not a folder" in err and str(a_file) in err


def test_bench_kernels_refuses_an_output_dir_that_is_a_file(a_file, capsys):
    assert cli.main(["bench", "kernels", "--output-dir", str(a_file)]) == 2
    assert "not a folder" in _one_line_error(capsys, "fastft bench: error: --output-dir")


def test_bench_accepts_a_new_or_existing_folder(tmp_path):
    BenchConfig(shape="tiny", output_dir=str(tmp_path)).validate()
    BenchConfig(shape="tiny", output_dir=str(tmp_path / "new" / "deeper")).validate()


@pytest.mark.parametrize("plan", [["--plan"], []])
def test_study_refuses_an_output_dir_that_is_a_file(a_file, capsys, plan):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["study", "--quick", "--output-dir", str(a_file), *plan])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "error: --output-dir" in err and "not a folder" in err and "Traceback" not in err
    with pytest.raises(ValueError, match="--output-dir"):
        StudyConfig(output_dir=str(a_file / "below")).validate()


# --- bug 2: fastft bench's --model, float knobs, duplicates; a table with nothing measured -----------------------

def _tiny_but(argv: list[str]) -> list[str]:
    """TINY without the flags `argv` gives (a list flag given twice is refused)."""
    given, out, keep = {a for a in argv if a.startswith("--")}, [], True
    for a in TINY:
        keep = a not in given if a.startswith("--") else keep
        out += [a] if keep else []
    return out


@pytest.mark.parametrize("argv, names", [
    (["--model", "/nonexistent/model"], ["--model", "/nonexistent/model", "config.json"]),
    (["--alpha", "nan"], ["--alpha", "nan"]),
    (["--alpha", "inf"], ["--alpha", "inf"]),
    (["--alpha", "0"], ["--alpha", "> 0"]),
    (["--alpha", "-16"], ["--alpha", "-16"]),
    (["--lr", "nan"], ["--lr", "nan"]),
    (["--lr", "0"], ["--lr", "> 0"]),
    (["--methods", "lora", "lora"], ["--methods", "lora", "twice"]),
    (["--methods", "lora,dora,lora"], ["--methods", "lora", "twice"]),
    (["--peers", "peft", "peft"], ["--peers", "peft", "twice"]),
])
def test_bench_bad_flags_are_refused_before_any_run(capsys, monkeypatch, argv, names):
    from fastft.apps.bench import run

    monkeypatch.setattr(run, "run_one", lambda *a, **k: pytest.fail("a run started before the check"))
    assert cli.main(["bench", *_tiny_but(argv), *argv]) == 2
    err = _one_line_error(capsys, "fastft bench: error:")
    assert all(n in err for n in names), err


def test_bench_config_checks_lr_too():
    with pytest.raises(ValueError, match="lr must be a finite number > 0, got nan"):
        BenchConfig(shape="tiny", lr=math.nan).validate()


def _fake_table(statuses):
    def bench_methods(cfg, on_row=None, **kwargs):
        rows = [{"method": "lora", "implementation": impl, "peer": impl, "compile": "off", "status": status}
                for impl, status in zip(("fastft", "peft"), statuses)]
        for row in rows:
            if row["status"] == "ok":
                row.update(tokens_per_s=1000.0, step_ms=8.0, peak_gib=0.1, trainable_params=10,
                           memory_kind="cpu peak RSS")
            else:
                row["error"] = "RuntimeError: boom"
        config = vars(cfg) | {"device": "cpu", "dtype_resolved": "fp32"}
        return {"environment": {"card": "cpu", "versions": {}}, "config": config, "rows": rows, "wall_s": 0.1}
    return bench_methods


@pytest.mark.parametrize("statuses, code", [(("error", "error"), 1), (("error", "unavailable"), 1),
                                            (("ok", "error"), 0)])
def test_bench_exits_non_zero_when_no_run_measured_anything(tmp_path, capsys, monkeypatch, statuses, code):
    from fastft.apps.bench import methods

    monkeypatch.setattr(methods, "bench_methods", _fake_table(statuses))
    assert cli.main(["bench", "--shape", "tiny", "--formats", "json", "md", "--output-dir", str(tmp_path)]) == code
    out, err = capsys.readouterr()
    assert (tmp_path / "bench_methods.md").is_file() and "| lora |" in out   # the table is still written
    if code:
        assert len(err.strip().splitlines()) == 1 and "none of the 2 runs measured anything" in err, err
    else:
        assert err == ""


# --- bug 3: fastft study's learning rates ------------------------------------------------------------------------

@pytest.mark.parametrize("argv, flag", [(["--lr", "nan"], "--lr"), (["--lr", "lora=inf"], "--lr"),
                                        (["--lr", "lora=-1e-3"], "--lr"), (["--head-lr", "-1"], "--head-lr"),
                                        (["--head-lr", "0"], "--head-lr"), (["--head-lr", "nan"], "--head-lr"),
                                        (["--head-lr", "inf"], "--head-lr")])
def test_study_rates_must_be_finite_and_positive(tmp_path, capsys, argv, flag):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["study", "--quick", "--plan", "--output-dir", str(tmp_path / "s"), *argv])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"error: {flag} must be a finite number > 0" in err, err


def test_study_help_describes_every_flag(capsys):
    _, commands = cli._parser()
    assert [a.option_strings for a in commands["study"]._actions if not a.help] == []
    with pytest.raises(SystemExit):
        cli.main(["study", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--no-peft fastft's implementation of each method only" in text


@pytest.mark.parametrize("argv, message", [(["--threads", "0"], "--threads must be at least 1, got 0"),
                                           (["--lr", "lora=x"], "--lr: expected RATE or METHOD=RATE"),
                                           (["--seeds", "0"], "--seeds")])
def test_study_errors_name_the_subcommand(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["study", "--quick", "--plan", "--output-dir", str(tmp_path / "s"), *argv])
    assert exit_.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(f"fastft study: error: {message}"), last


def test_study_rates_message_names_the_method():
    with pytest.raises(ValueError, match=r"--lr must be a finite number > 0, got inf \(for lora\)"):
        StudyConfig(lr={"lora": math.inf}).validate()
    StudyConfig(lr={"lora": 1e-3}, head_lr=1e-3).validate()


# --- bug 4: a cell whose training loss became non-finite -----------------------------------------------------------

SETTINGS = CellSettings(steps=6, batch_size=4, max_length=8, lr=1e-2, head_lr=1e-2, evals=3, max_dev=8,
                        max_test=8)
SPEC = CellSpec("minilm", "subj", "full", "full", "fastft", 0)


@pytest.fixture
def stand_in_model(monkeypatch):
    """run_cell's real loop on a stand-in: a 2-class logistic regression over one feature (the row's text)."""
    task = _toy_task()

    monkeypatch.setattr(cell_module, "load_study_task", lambda name: task)
    monkeypatch.setattr(cell_module, "prepare_model", lambda family, task, max_length, seed:
                        stand_in_prepared(lambda n: torch.ones(n, 1)))
    monkeypatch.setattr(cell_module, "apply_method", lambda model, method, options, implementation: model)


def test_a_cell_whose_loss_turns_nan_is_diverged_without_a_score(stand_in_model):
    cpu = torch.device("cpu")
    done = run_cell(SPEC, SETTINGS, cpu)
    assert done["status"] == "done", done.get("traceback")   # the stand-in trains at a sane rate
    result = run_cell(SPEC, CellSettings(**{**asdict(SETTINGS), "lr": math.nan}), cpu)
    assert result["status"] == "diverged", result.get("traceback")
    assert "step 2 of 6" in result["reason"] and "nan" in result["reason"]
    assert math.isfinite(result["train_losses"][0]) and math.isnan(result["train_losses"][-1])
    assert len(result["train_losses"]) == 2   # stopped at the first non-finite loss
    assert not {"test_accuracy", "test_metric", "tokens_per_second"} & set(result)


def test_an_inf_loss_diverges_too():
    with pytest.raises(cell_module.Diverged, match="training loss inf at step 3 of 6"):
        cell_module.check_loss([0.7, 0.6, math.inf], SETTINGS)
    cell_module.check_loss([0.7, 0.6], SETTINGS)


def test_a_diverged_cell_is_read_back_on_resume_not_rerun(tmp_path):
    path = tmp_path / "c.json"
    write_json_atomic(path, {"status": "diverged", "settings": asdict(SETTINGS), "reason": "training loss nan"})
    assert _finished(path, SETTINGS)["status"] == "diverged"
    assert _finished(path, CellSettings(**{**asdict(SETTINGS), "lr": 1e-4})) is None   # new settings: run it
    write_json_atomic(path, {"status": "failed", "settings": asdict(SETTINGS)})
    assert _finished(path, SETTINGS) is None


def _scored(task, method, seed, score, status="done"):
    cell = {"model": "minilm", "task": task, "regime": "32-per-class", "method": method, "implementation": "fastft",
            "seed": seed, "status": status}
    if status == "done":
        cell.update(metric="accuracy", test_metric=score, test_accuracy=score, test_macro_f1=score,
                    trainable_parameters=1000, total_parameters=22_700_000, tokens_per_second=500.0,
                    peak_memory_gib=1.0, peak_memory_kind="process RSS, sampled per step", wall_seconds=5.0)
    else:
        cell["reason"] = f"training loss nan at step {seed + 2} of 8 (lr 1, head lr 0.003)"
    return cell


def test_report_shows_diverged_cells_as_diverged_and_leaves_them_out_of_the_scores(tmp_path):
    tasks = {t: {"name": t, "metric": "accuracy", "split_seed": 1234, "sizes": {"train": 100, "dev": 10, "test": 20},
                 "duplicates_dropped": 0, "label_words": [" a", " b"], "balance": {"test": {"a": 10, "b": 10}},
                 "majority": {"label": "a", "accuracy": 0.5, "macro_f1": 1 / 3, "examples": 20}}
             for t in ("subj", "mr")}
    cells = [_scored("subj", "lora", 0, 0.90), _scored("mr", "lora", 0, 0.80),
             _scored("subj", "ia3", 0, 0.0, "diverged"), _scored("mr", "ia3", 0, 0.70),
             _scored("subj", "full", 0, 0.86), _scored("subj", "full", 1, 0.0, "diverged"),
             _scored("mr", "full", 0, 0.76), _scored("mr", "full", 1, 0.78)]
    results = {"tasks": tasks, "cells": cells, "environment": {"device_name": "cpu"},
               "config": asdict(StudyConfig(seeds=2, tasks=("subj", "mr")))}
    report = write_report(results, tmp_path)["report"].read_text()
    assert "| ia3 | diverged | 70.0 |  |" in report   # no mean over tasks with a diverged one
    assert "| full | 86.0* | 77.0 ± 1.4 | 81.5 |" in report   # the scored seed, marked: one is missing
    assert "| minilm | ia3 | fastft | diverged | training loss nan at step 2 of 8 (lr 1, head lr 0.003) | subj |" \
        in report
    # the diverged seed beside a scored one is listed too (it was hidden behind the group's score)
    assert "| minilm | full | fastft | diverged | training loss nan at step 3 of 8 (lr 1, head lr 0.003) | subj |" \
        in report


def test_study_reads_a_diverged_cell_back_and_reports_it(tmp_path, monkeypatch):
    calls = []

    def fake_run_cell(spec, settings):
        calls.append(spec.key)
        return {"key": spec.key, **asdict(spec), "settings": asdict(settings), "status": "diverged",
                "reason": "training loss nan at step 1 of 2 (lr nan, head lr 0.003)", "wall_seconds": 0.0}

    monkeypatch.setattr(runner_module, "run_cell", fake_run_cell)
    monkeypatch.setattr(runner_module, "load_study_task", lambda name: _toy_task())
    config = StudyConfig(methods=("lora",), tasks=("subj",), models=("minilm",), regimes=("32-per-class",), seeds=1,
                         steps=2, with_peft=False, output_dir=str(tmp_path))
    logged = []
    first = runner_module.run_study(config, progress=False, log=logged.append)
    assert len(calls) == 1 and [c["status"] for c in first["cells"]] == ["diverged"]
    assert any("1 cells diverged" in line for line in logged)
    again = runner_module.run_study(config, progress=False, log=logged.append)
    assert len(calls) == 1 and again["resumed_cells"] == 1   # read back, not rerun
    report = write_report(again, tmp_path)["report"].read_text()
    assert "| lora | diverged |" in report and "| minilm | lora | fastft | diverged |" in report


# --- bug 5: the tasks table's test columns describe the rows the cells are tested on ------------------------------

def test_tasks_table_describes_the_capped_test_rows(tmp_path, monkeypatch):
    # 10 test rows, 8 of class a; --max-test 4 tests each class its share: 3 a and 1 b (the first 4: 2 and 2)
    test = [("x", 0), ("y", 1), ("z", 0), ("w", 1)] + [(f"t{i}", 0) for i in range(6)]
    task = _toy_task(test_rows=test)
    monkeypatch.setattr(runner_module, "load_study_task", lambda name: task)
    monkeypatch.setattr(runner_module, "run_cell", lambda spec, settings: {
        **asdict(spec), "key": spec.key, "settings": asdict(settings), "status": "failed", "reason": "skipped"})
    config = StudyConfig(methods=("lora",), tasks=("subj",), models=("minilm",), regimes=("32-per-class",), seeds=1,
                         steps=2, with_peft=False, max_test=4, output_dir=str(tmp_path))
    results = runner_module.run_study(config, progress=False, log=lambda line: None)
    info = results["tasks"]["subj"]
    assert info["tested"] == {"examples": 4, "balance": {"a": 3, "b": 1}} and info["majority"]["examples"] == 4
    report = write_report(results, tmp_path)["report"].read_text()
    assert "| test (tested rows) |" in report and "| test balance (tested rows) |" in report
    assert "| subj | accuracy | 16 | 8 | 4 of 10 | 0 | a 3, b 1 | a (75.0% acc) |" in report
    uncapped = runner_module.run_study(StudyConfig(**{**asdict(config), "max_test": None}), progress=False,
                                       log=lambda line: None)
    assert uncapped["tasks"]["subj"]["tested"] == {"examples": 10, "balance": {"a": 8, "b": 2}}
    assert "| subj | accuracy | 16 | 8 | 10 | 0 | a 8, b 2 | a (80.0% acc) |" in \
        write_report(uncapped, tmp_path)["report"].read_text()


def test_tasks_table_of_an_older_results_file_still_renders(tmp_path):
    tasks = {"subj": {"name": "subj", "metric": "accuracy", "split_seed": 1234,
                      "sizes": {"train": 100, "dev": 10, "test": 20}, "duplicates_dropped": 0,
                      "label_words": [" a", " b"], "balance": {"test": {"a": 10, "b": 10}},
                      "majority": {"label": "a", "accuracy": 0.5, "macro_f1": 1 / 3, "examples": 20}}}
    results = {"tasks": tasks, "cells": [_scored("subj", "lora", 0, 0.9)], "environment": {},
               "config": asdict(StudyConfig(seeds=1, tasks=("subj",)))}
    assert "| subj | accuracy | 100 | 10 | 20 | 0 | a 10, b 10 | a (50.0% acc) |" in \
        write_report(results, tmp_path)["report"].read_text()
