"""`fastft study`: the plan, one cell's bookkeeping, the report writer and the command's arguments. A real study,
killed with SIGKILL after its first cell and resumed, is tests/test_study_quick.py."""
from dataclasses import asdict

import pytest

from fastft.apps.study import cell as cell_module
from fastft.apps.study.cell import CellSettings, CellSpec, macro_f1, run_cell
from fastft.apps.study.report import aggregate, anchor_rows, headline, write_report
from fastft.apps.study.runner import StudyConfig, _finished, plan, quick_config, write_json_atomic

SETTINGS = CellSettings(steps=4, batch_size=4, max_length=16, lr=1e-3, head_lr=1e-3, evals=2, max_dev=8,
                        max_test=8)


def test_plan_pairs_each_method_with_its_peft_anchor():
    config = StudyConfig(methods=("lora", "full", "adapter", "ia3"), tasks=("subj",), models=("minilm",),
                         regimes=("32-per-class", "full"), seeds=2)
    cells = plan(config)
    keys = {(s.regime, s.method, s.implementation, s.seed) for s, _ in cells}
    assert len(cells) == len(keys) == 2 * 2 * (4 + 2)  # lora and ia3 have a peft anchor; full and adapter not
    assert ("full", "full", "peft", 0) not in keys and ("full", "ia3", "peft", 1) in keys
    steps = {s.regime: st.steps for s, st in cells}
    assert steps == {"32-per-class": 60, "full": 150}
    lrs = {s.method: st.lr for s, st in cells}
    assert lrs["full"] < lrs["lora"] < lrs["ia3"]
    assert len(plan(StudyConfig(with_peft=False, seeds=1))) == 8 * 6 * 2 * 2


@pytest.mark.parametrize("steps, evals, want", [(16, 6, 6), (10, 6, 6), (150, 4, 4), (3, 6, 3), (1, 1, 1)])
def test_a_cell_evaluates_the_dev_split_evals_times(steps, evals, want):
    """--evals is the number of dev evaluations (steps // evals as an interval gave 8 for 16 steps and 6 evals)."""
    from fastft.apps.study.cell import evaluation_steps

    at = evaluation_steps(steps, evals)
    assert len(at) == want and max(at) == steps and at <= set(range(1, steps + 1))
    if evals < steps:  # evenly spread: gaps differ by at most one step
        gaps = [b - a for a, b in zip([0, *sorted(at)], sorted(at))]
        assert max(gaps) - min(gaps) <= 1, sorted(at)


def test_macro_f1():
    assert macro_f1([0, 0, 1, 1], [0, 0, 1, 1]) == 1.0
    assert macro_f1([0, 0, 0, 0], [0, 0, 1, 1]) == pytest.approx((2 / 3) / 2)
    assert macro_f1([0, 1, 2], [0, 1, 1]) == pytest.approx((1 + 2 / 3 + 0) / 3)


@pytest.mark.parametrize("error,status", [(NotImplementedError("method 'ia3' has no fastft room yet"), "unavailable"),
                                          (RuntimeError("boom"), "failed")])
def test_a_cell_that_cannot_run_is_recorded_without_a_number(monkeypatch, error, status):
    def refuse(*args, **kwargs):
        raise error

    monkeypatch.setattr(cell_module, "_train_and_test", refuse)
    result = run_cell(CellSpec("minilm", "subj", "32-per-class", "ia3", "fastft", 0), SETTINGS)
    assert result["status"] == status and str(error) in result["reason"]
    assert "test_accuracy" not in result and "tokens_per_second" not in result


def test_only_finished_cells_with_the_same_settings_are_reused(tmp_path):
    path = tmp_path / "c.json"
    assert _finished(path, SETTINGS) is None
    write_json_atomic(path, {"status": "unavailable", "settings": asdict(SETTINGS)})
    assert _finished(path, SETTINGS) is None  # retried: the method may have landed since
    write_json_atomic(path, {"status": "done", "settings": asdict(SETTINGS)})
    assert _finished(path, SETTINGS)["status"] == "done"
    changed = CellSettings(**{**asdict(SETTINGS), "steps": 5})
    assert _finished(path, changed) is None
    path.write_text('{"status": "do')  # a torn file (not written by write_json_atomic) is rerun, not trusted
    assert _finished(path, SETTINGS) is None


def _cell(model, task, method, impl, seed, score, trainable, tps, metric="accuracy"):
    f1 = metric == "macro_f1"
    return {"model": model, "task": task, "regime": "32-per-class", "method": method, "implementation": impl,
            "seed": seed, "status": "done", "metric": metric, "test_metric": score,
            "test_accuracy": score + 0.05 if f1 else score, "test_macro_f1": score if f1 else score - 0.01, "trainable_parameters": trainable, "total_parameters": 22_700_000,
            "tokens_per_second": tps, "peak_memory_gib": 1.0, "peak_memory_kind": "process RSS, sampled per step",
            "wall_seconds": 10.0}


def _tasks_info(names):
    info = {}
    for name in names:
        info[name] = {"name": name, "metric": "macro_f1" if name == "trec" else "accuracy", "split_seed": 1234,
                      "sizes": {"train": 100, "dev": 10, "test": 20}, "duplicates_dropped": 0,
                      "label_words": [" a", " b"], "balance": {"test": {"a": 10, "b": 10}},
                      "majority": {"label": "a", "accuracy": 0.5, "macro_f1": 1 / 3, "examples": 20}}
    return info


def test_report_writer_tables_plots_and_headline(tmp_path):
    """The writer on a hand-made result set: LoRA best on average, peft agreeing on subj and not on trec."""
    cells = []
    for seed, jitter in ((0, 0.0), (1, 0.01), (2, -0.01)):
        cells += [_cell("minilm", "subj", "lora", "fastft", seed, 0.90 + jitter, 700_000, 900.0),
                  _cell("minilm", "subj", "lora", "peft", seed, 0.895 + jitter, 700_000, 800.0),
                  _cell("minilm", "subj", "full", "fastft", seed, 0.85 + jitter, 22_700_000, 600.0),
                  _cell("minilm", "trec", "lora", "fastft", seed, 0.80 + jitter, 700_000, 900.0, "macro_f1"),
                  _cell("minilm", "trec", "lora", "peft", seed, 0.60 + jitter, 700_000, 800.0, "macro_f1"),
                  _cell("minilm", "trec", "full", "fastft", seed, 0.78 + jitter, 22_700_000, 600.0, "macro_f1")]
    cells.append({"model": "minilm", "task": "subj", "regime": "32-per-class", "method": "ia3",
                  "implementation": "fastft", "seed": 0, "status": "unavailable",
                  "reason": "method 'ia3' has no fastft room yet"})
    results = {"tasks": _tasks_info(["subj", "trec"]), "cells": cells,
               "config": asdict(StudyConfig(seeds=3)), "environment": {"device_name": "cpu"}}
    paths = write_report(results, tmp_path)
    report = paths["report"].read_text()
    assert "| lora | 90.0 ± 1.0 | 80.0 ± 1.0 (acc 85.0) | 85.0 |" in report
    assert "| full | 85.0 ± 1.0 | 78.0 ± 1.0 (acc 83.0) | 81.5 |" in report
    assert "| majority class | 50.0 | 33.3 (acc 50.0) | |" in report
    assert "subj (acc)" in report and "trec (F1)" in report
    assert "| ia3 | fastft | unavailable | method 'ia3' has no fastft room yet |" in report
    assert "| lora (peft) | 700k |" in report and "| full | 22.7M |" in report
    assert "| lora | subj, trec | — |" in report
    assert "| minilm | 32-per-class | trec | lora | 80.0 | 60.0 | +20.0 |" in report and "**differs**" in report
    assert "| minilm | 32-per-class | subj | lora | 90.0 | 89.5 | +0.5 | 1.0 | 3 | ok |" in report
    text = headline(aggregate(cells), results["tasks"])
    assert "lora scores best on average (85.0" in text and "Full fine-tuning scores 81.5" in text
    assert "agrees with fastft's within noise in 1 of 2" in text
    import matplotlib.image

    pngs = sorted((tmp_path / "plots").glob("*.png"))
    assert [p.name for p in pngs] == ["score_vs_params.png", "score_vs_tokens_per_second.png",
                                      "tasks_minilm-32-per-class.png"]
    for p in pngs:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        image = matplotlib.image.imread(p)
        assert image.shape[0] > 100 and image.shape[1] > 100 and image.std() > 0
    assert not [p for p in tmp_path.rglob(".*tmp")]
    # without matplotlib (not a dependency of fastft; the study imported it at module level): the tables, no plots
    import importlib.util

    real = importlib.util.find_spec
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
        paths = write_report(results, tmp_path / "no-plots")
    assert set(paths) == {"report"} and not (tmp_path / "no-plots" / "plots").exists()
    text = paths["report"].read_text()
    assert "No plots: matplotlib is not installed" in text and "![" not in text and "| lora | 90.0 ± 1.0" in text


def _anchor(fastft: dict, peft: dict) -> dict:
    """The one anchor row of fastft and peft scores by seed ({seed: score})."""
    (row,) = anchor_rows(aggregate([_cell("minilm", "subj", "lora", impl, seed, score, 1, 1.0)
                                    for impl, scores in (("fastft", fastft), ("peft", peft))
                                    for seed, score in scores.items()]))
    return row


def test_the_anchor_compares_the_seeds_both_implementations_scored():
    """peft's seed 1 failed; on seed 0 both scored 70: the same, not fastft's two-seed mean (80) against 70."""
    cells = [_cell("minilm", "subj", "lora", "fastft", 0, 0.70, 1, 1.0),
             _cell("minilm", "subj", "lora", "fastft", 1, 0.90, 1, 1.0),
             _cell("minilm", "subj", "lora", "peft", 0, 0.70, 1, 1.0),
             {**_cell("minilm", "subj", "lora", "peft", 1, 0.0, 1, 1.0), "status": "failed"}]
    (row,) = anchor_rows(aggregate(cells))
    assert (row["fastft"], row["peft"], row["diff"], row["seeds"], row["flagged"]) == (70.0, 70.0, 0.0, 1, False)
    assert not anchor_rows(aggregate(cells[1:2] + cells[3:]))  # no seed in common: no row


def test_the_anchor_pairs_the_seeds():
    """Seeds vary far more than the implementations differ: peft 4-5 points above fastft on every seed is flagged
    (paired t = -15.6, p = 0.004), while a gap of either sign seed by seed is noise."""
    row = _anchor({0: 0.70, 1: 0.80, 2: 0.90}, {0: 0.74, 1: 0.85, 2: 0.945})
    assert row["diff"] == pytest.approx(-4.5) and row["flagged"]
    assert row["threshold"] == pytest.approx(4.303 * 0.5 / 3 ** 0.5, rel=1e-3)  # t(0.975, 2) · sd / √n
    row = _anchor({0: 0.70, 1: 0.80, 2: 0.90}, {0: 0.74, 1: 0.79, 2: 0.915})
    assert row["diff"] == pytest.approx(-1.5) and not row["flagged"]


def test_one_seed_threshold_is_three_points():
    groups = aggregate([_cell("minilm", "subj", "lora", "fastft", 0, 0.80, 1, 1.0),
                        _cell("minilm", "subj", "lora", "peft", 0, 0.775, 1, 1.0),
                        _cell("minilm", "mr", "lora", "fastft", 0, 0.80, 1, 1.0),
                        _cell("minilm", "mr", "lora", "peft", 0, 0.765, 1, 1.0)])
    flags = {r["task"]: r["flagged"] for r in anchor_rows(groups)}
    assert flags == {"subj": False, "mr": True}


@pytest.mark.parametrize("argv,message", [
    (["study", "--steps", "0"], "--steps must be at least 1"),
    (["study", "--lr", "lora=fast"], "expected RATE or METHOD=RATE"),
    (["study", "--lr", "nope=1e-3"], "--lr: expected positive rates"),
    (["study", "--lr", "lora=1e-3", "lora=5"], "--lr: lora given twice (lora=0.001, lora=5); keep one"),
    (["study", "--methods", "bitfit"], "invalid choice: 'bitfit'"),
    (["study", "--quick", "--max-test", "0"], "--max-test must be at least 1"),
    (["study", "--threads", "0"], "--threads must be at least 1"),
    (["study", "--output-dir", ""], "--output-dir is empty"),  # wrote into the current folder
    (["train", "--output-dir", " "], "--output-dir is empty"),
])
def test_bad_arguments(argv, message, capsys):
    from fastft.apps.cli import main

    with pytest.raises(SystemExit):
        main(argv)
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("order", [["lora=2e-3", "1e-3"], ["1e-3", "lora=2e-3"]])
def test_a_methods_own_lr_wins_over_a_bare_one_in_either_order(order):
    from fastft.apps.study.command import _parse_lr

    rates = _parse_lr(order)
    assert rates["lora"] == 2e-3 and all(rate == 1e-3 for method, rate in rates.items() if method != "lora")


def test_an_lr_for_a_method_not_run_is_noted(tmp_path, capsys):
    from fastft.apps.cli import main

    assert main(["study", "--plan", "--methods", "lora", "--lr", "qlora=0.1", "lora=1e-3",
                 "--output-dir", str(tmp_path / "none")]) == 0
    assert "note: --lr qlora=0.1 is not used (not in the methods run: lora)" in capsys.readouterr().out


def test_quick_config_and_overrides():
    from fastft.apps.cli import main  # noqa: F401  (the parser builds)
    config = quick_config(tasks=("mr",))
    assert config.quick and config.seeds == 1 and config.models == ("minilm",) and config.tasks == ("mr",)
    assert set(config.methods) >= {"lora", "full", "ia3", "prompt"}


def test_mean_pooler_counts_real_tokens_only():
    import torch

    from fastft.apps.study.models import MaskedMeanPooler

    pooler = MaskedMeanPooler()
    states = torch.randn(2, 5, 3, dtype=torch.float64)
    pooler.mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    out = pooler(states)
    assert torch.allclose(out[0], states[0, :3].mean(0)) and torch.allclose(out[1], states[1].mean(0))
    pooler.mask = torch.tensor([[1, 1, 0], [1, 1, 1]])  # prompt tuning: 2 virtual tokens in front, not in the mask
    assert torch.allclose(pooler(states)[0], states[0, :4].mean(0))
    pooler.mask = torch.tensor([[1, 1, 1, 1, 1, 1, 0], [1] * 7])  # prefix tuning: the mask covers the prefix too
    assert torch.allclose(pooler(states)[0], states[0, :4].mean(0))


@pytest.mark.slow
def test_smollm2_cell_trains_through_label_words():
    """One real SmolLM2 cell, one step: LoRA only (no head: the LM head scores the label words)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        settings = CellSettings(steps=1, batch_size=2, max_length=16, lr=1e-3, head_lr=1e-3, evals=1,
                                max_dev=4, max_test=4)
        result = run_cell(CellSpec("smollm2", "trec", "32-per-class", "lora", "fastft", 0), settings)
    finally:
        torch.set_num_threads(threads)
    assert result["status"] == "done", result.get("traceback")
    # r=16 × (in + out) of each of the 7 linears (q, k, v, o, gate, up, down) in 30 layers; nothing else trains
    shapes = [(576, 576), (576, 192), (576, 192), (576, 576), (576, 1536), (576, 1536), (1536, 576)]
    assert result["trainable_parameters"] == 30 * sum(16 * (i + o) for i, o in shapes)
    assert result["test_examples"] == 4 and result["metric"] == "macro_f1"
    assert result["tokens_per_second"] > 0 and result["peak_memory_gib"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("method", ["prompt", "prefix", "lora"])
def test_smollm2_row_scores_as_it_does_alone_whatever_its_batch(method):
    """Label-word logits of a short row: the same alone, batched behind a longer row (padded), and taken from the
    whole forward's logits at its last token. Left padding put the padding between prompt tuning's virtual tokens
    (or the prefix) and the text, and moved the text's positions with the batch's longest row."""
    import torch

    from fastft.apps.study.models import _base, label_token_ids, prepare_model
    from fastft.apps.study.tasks import load_study_task
    from fastft.integration.methods import apply_method
    from tests.methods_utils import perturb_trainables
    from tests.utils import assert_close

    task = load_study_task("sms-spam")
    rows = sorted(task.test[:40], key=lambda r: len(r[0]))
    short, long = rows[0], rows[-1]
    prepared = prepare_model("smollm2", task, 64, 0)
    model = apply_method(prepared.model, method, prepared.options).eval()
    perturb_trainables(model, std=0.05)  # off the initialisation (LoRA's B = 0 would hide the adapter)
    words = torch.tensor(label_token_ids(_base("smollm2")[1], task.label_words))
    with torch.no_grad():
        alone = prepared.class_logits(model, prepared.collate([short]))[0]
        batch = prepared.collate([long, short])
        assert batch["attention_mask"][1, -1] == 0, "the short row is padded"
        batched = prepared.class_logits(model, batch)[1]
        whole = model(input_ids=prepared.collate([short])["input_ids"]).logits[0, -1, words].float()
    assert_close(batched, alone, torch.float32, f"{method}: batched vs alone")
    assert_close(alone, whole, torch.float32, f"{method}: vs the whole forward's last logits")


def test_plan_flag_prints_the_cells_and_runs_nothing(tmp_path, capsys):
    from fastft.apps.cli import main

    assert main(["study", "--plan", "--output-dir", str(tmp_path / "none")]) == 0
    printed = capsys.readouterr().out
    # qlora has no peft anchor; MiniLM's fastft prefix cells are unavailable, their steps not counted
    assert "936 cells, 94,500 training steps" in printed and "smollm2: 288 fastft, 180 peft" in printed
    assert "minilm: 252 fastft, 180 peft" in printed and "36 minilm prefix (fastft)" in printed
    assert not (tmp_path / "none").exists()
