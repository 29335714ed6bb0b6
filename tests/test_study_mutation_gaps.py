"""Study behaviours no other test pins: test scores from the best dev state (the first of tied ones), the cell's
lr schedule, real-token counts, largest-remainder apportioning, and the report's picks, flags and peaks."""
import math

import pytest
import torch
from torch import nn

from fastft.apps.study import cell as cell_module
from fastft.apps.study.cell import CellSettings, CellSpec, run_cell
from fastft.apps.study.report import aggregate, anchor_rows, headline
from fastft.apps.study.tasks import _apportion
from tests.test_study_review_fixes import use_stand_in

SPEC = CellSpec("minilm", "subj", "32-per-class", "lora", "peft", 0)


@pytest.fixture
def stand_in(monkeypatch):
    """run_cell's loop on a 2-class logistic regression; each row has 2 real tokens of a width-4 mask."""
    use_stand_in(monkeypatch, lambda n: torch.cat([torch.ones(n, 2), torch.zeros(n, 2)], 1))


def test_test_split_is_scored_with_the_first_best_dev_state(stand_in, monkeypatch):
    settings = CellSettings(steps=6, batch_size=4, max_length=8, lr=0.5, head_lr=0.5, evals=3, max_dev=None,
                            max_test=None)
    dev_scores = iter([0.5, 0.8, 0.8])  # dev at steps 2, 4, 6: a tie, the earlier state is the best
    seen = []

    def fake_evaluate(prepared, model, rows, batch_size, device, autocast):
        seen.append({n: p.detach().clone() for n, p in model.named_parameters()})
        score = next(dev_scores, 0.0)
        return {"accuracy": score, "macro_f1": score, "examples": len(rows)}

    monkeypatch.setattr(cell_module, "evaluate", fake_evaluate)
    result = run_cell(SPEC, settings, torch.device("cpu"))
    assert result["status"] == "done", result.get("traceback")
    assert result["dev_best_step"] == 4 and result["dev_best"] == 0.8
    step4, step6, tested = seen[1], seen[2], seen[3]
    assert any(not torch.equal(step4[n], step6[n]) for n in step4)  # training moved the weights after step 4
    for n in step4:
        assert torch.equal(tested[n], step4[n]), n


def test_train_tokens_count_real_tokens_not_padding(stand_in):
    settings = CellSettings(steps=5, batch_size=4, max_length=8, lr=0.1, head_lr=0.1, evals=1, max_dev=None,
                            max_test=None)
    result = run_cell(SPEC, settings, torch.device("cpu"))
    assert result["status"] == "done", result.get("traceback")
    assert result["train_tokens"] == 2 * settings.batch_size * settings.steps


def test_cell_schedule_warms_up_over_a_tenth_of_the_steps_then_cosine():
    factor = cell_module._schedule(100)
    cosine = lambda s: 0.5 * (1 + math.cos(math.pi * s / 100))  # noqa: E731
    assert factor(0) == pytest.approx(0.1 * cosine(0))
    assert factor(4) == pytest.approx(0.5 * cosine(4))
    assert factor(9) == pytest.approx(cosine(9))
    assert factor(50) == pytest.approx(cosine(50))
    assert cell_module._schedule(5)(0) == pytest.approx(1.0)  # under 10 steps: one warm-up step


def test_apportion_gives_the_extra_rows_to_the_largest_remainders():
    assert _apportion([8, 2], 3) == [2, 1]        # quotas 2.4 and 0.6
    assert _apportion([70, 20, 10], 4) == [3, 1, 0]  # quotas 2.8, 0.8, 0.4
    assert sum(_apportion([5, 7, 11], 9)) == 9


def _cell(method, impl, seed, score, trainable=1_000, peak=1.0, task="subj"):
    return {"model": "minilm", "task": task, "regime": "32-per-class", "method": method, "implementation": impl,
            "seed": seed, "status": "done", "metric": "accuracy", "test_metric": score, "test_accuracy": score,
            "test_macro_f1": score, "trainable_parameters": trainable, "total_parameters": 22_700_000,
            "tokens_per_second": 100.0, "peak_memory_gib": peak, "peak_memory_kind": "process RSS",
            "wall_seconds": 1.0}


def test_headline_names_the_cheapest_method_within_two_points():
    cells = [_cell("lora", "fastft", 0, 0.90, trainable=700_000), _cell("dora", "fastft", 0, 0.89, 800_000),
             _cell("ia3", "fastft", 0, 0.885, 50_000)]
    info = {"subj": {"metric": "accuracy", "majority": {"accuracy": 0.5, "macro_f1": 1 / 3}}}
    text = headline(aggregate(cells), info)
    assert "lora scores best on average (90.0" in text
    assert "ia3 comes within 2 points (88.5)" in text


def test_headline_names_every_method_tied_at_the_top():
    """A tie as the report prints it (one decimal) names them all, the cheapest described; dict order picked one."""
    cells = [_cell("dora", "fastft", 0, 0.90, trainable=800_000), _cell("lora", "fastft", 0, 0.9004, 700_000),
             _cell("ia3", "fastft", 0, 0.85, 50_000),
             _cell("dora", "fastft", 0, 0.80, 800_000, task="sst2"), _cell("lora", "fastft", 0, 0.70, 700_000,
                                                                            task="sst2"),
             _cell("ia3", "fastft", 0, 0.80, 50_000, task="sst2")]
    info = {t: {"metric": "accuracy", "majority": {"accuracy": 0.5, "macro_f1": 1 / 3}} for t in ("subj", "sst2")}
    text = headline(aggregate(cells), info)
    assert "dora scores best on average (85.0 over 2 tasks, 800k trainable" in text, text
    assert "per task: dora and lora on subj (90.0), dora and ia3 on sst2 (80.0)." in text, text
    tied = headline(aggregate(cells[:3]), {"subj": info["subj"]})
    assert "dora and lora score best on average (90.0 over 1 task, lora: 700k trainable parameters" in tied, tied
    assert "per task: dora and lora on subj (90.0)." in tied, tied
    ten = headline(aggregate([_cell("lora", "fastft", 0, 1.0), _cell("ia3", "fastft", 0, 0.95)]), info)
    assert "lora scores best on average (100.0" in ten and "lora on subj (100.0)." in ten, ten  # 100.0 > 95.0


def test_anchor_flags_fastft_below_peft_too():
    groups = aggregate([_cell("lora", "fastft", 0, 0.70), _cell("lora", "peft", 0, 0.80)])
    (row,) = anchor_rows(groups)
    assert row["diff"] == pytest.approx(-10.0) and row["flagged"]


def test_peak_memory_is_the_largest_over_seeds():
    groups = aggregate([_cell("lora", "fastft", s, 0.8, peak=p) for s, p in enumerate((1.0, 3.0, 2.0))])
    assert groups[("minilm", "32-per-class", "subj", "lora", "fastft")]["peak_memory_gib"] == 3.0


def test_headline_speed_ratio_is_full_over_best():
    cells = [_cell("lora", "fastft", 0, 0.90, trainable=700_000), _cell("full", "fastft", 0, 0.85, 22_000_000)]
    cells[0]["tokens_per_second"], cells[1]["tokens_per_second"] = 900.0, 600.0
    info = {"subj": {"metric": "accuracy", "majority": {"accuracy": 0.5, "macro_f1": 1 / 3}}}
    text = headline(aggregate(cells), info)
    assert "Full fine-tuning scores 85.0 with 31× the trainable parameters at 0.67× the tokens/s." in text


def test_default_learning_rate_follows_the_model_family():
    from fastft.apps.study.runner import LR_DEFAULTS, StudyConfig, learning_rate, plan

    config = StudyConfig(methods=("full",), tasks=("subj",), models=("minilm", "smollm2"), regimes=("full",),
                         seeds=1, with_peft=False)
    assert learning_rate(config, "full", "minilm") == LR_DEFAULTS["full"][0] == 1e-4
    assert learning_rate(config, "full", "smollm2") == LR_DEFAULTS["full"][1] == 3e-5
    assert {spec.model: settings.lr for spec, settings in plan(config)} == {"minilm": 1e-4, "smollm2": 3e-5}


def test_a_packed_weight_shared_by_two_modules_counts_once():
    from fastft.apps.study.models import count_parameters

    class Packed:  # an NF4-like weight: not a Tensor, with a logical shape
        shape = (4, 8)

    inner, wrapper = nn.Module(), nn.Module()
    inner.weight = wrapper.weight = Packed()  # peft's wrapper exposes its base layer's weight too
    model = nn.Sequential(inner, wrapper, nn.Linear(2, 3))
    assert count_parameters(model) == (9, 9 + 32)
