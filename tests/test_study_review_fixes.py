"""`fastft study`, from a review of the study: a cell's result must not depend on what ran before it in the
process; tokens/s leaves out the warm-up steps; peak memory is the training steps' (the best state lives on the
CPU, evaluation is measured apart); resume reruns cells of another device or code version; near-duplicate texts
never straddle a split; macro-F1 averages over the classes present; MiniLM's adapter cells run and its fastft
prefix cells are unavailable without running; QLoRA has no peft anchor."""
from dataclasses import asdict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastft.apps.datasets import unique_texts
from fastft.apps.provenance import KERNEL_ENV
from fastft.apps.study import cell as cell_module
from fastft.apps.study import models as models_module
from fastft.apps.study import runner as runner_module
from fastft.apps.study.cell import CellSettings, CellSpec, macro_f1, run_cell
from fastft.apps.study.models import PreparedModel, prepare_model
from fastft.apps.study.report import write_report
from fastft.apps.study.runner import StudyConfig, _finished, plan, write_json_atomic
from fastft.apps.study.tasks import StudyTask, load_study_task, majority_baseline

SETTINGS = CellSettings(steps=6, batch_size=4, max_length=8, lr=1e-2, head_lr=1e-2, evals=3, max_dev=8,
                        max_test=8)


def _toy_task(test_rows=None, label_words=(" a", " b")) -> StudyTask:
    rows = [(str(i % 2), i % 2) for i in range(16)]
    return StudyTask("toy", "toy", "{text}", label_words, train=rows, dev=rows[:8], test=test_rows or rows[:8])


def stand_in_prepared(attention_mask=lambda n: torch.ones(n, 3), head_names=()) -> PreparedModel:
    """A study cell's model stand-in: a 2-class logistic regression over one feature (the row's text);
    attention_mask(n): a batch of n rows' mask (its ones are the tokens counted)."""
    model = nn.Linear(1, 2)

    def collate(rows):
        return {"x": torch.tensor([[float(t)] for t, _ in rows]), "attention_mask": attention_mask(len(rows)),
                "labels": torch.tensor([y for _, y in rows])}

    def class_logits(m, batch):
        return m(batch["x"])

    return PreparedModel("toy", model, None, collate, class_logits,
                         lambda m, b: F.cross_entropy(class_logits(m, b), b["labels"]), head_names)


def use_stand_in(monkeypatch, attention_mask=lambda n: torch.ones(n, 3)):
    """run_cell's real loop on the stand-in (stand_in_prepared) and the toy task."""
    monkeypatch.setattr(cell_module, "load_study_task", lambda name: _toy_task())
    monkeypatch.setattr(cell_module, "prepare_model", lambda family, task, max_length, seed:
                        stand_in_prepared(attention_mask))
    monkeypatch.setattr(cell_module, "apply_method", lambda model, method, options, implementation: model)


@pytest.fixture
def stand_in_model(monkeypatch):
    use_stand_in(monkeypatch)


# --- 1: the first MiniLM cell of a process got another head than later ones ------------------------------------

def test_minilm_head_does_not_depend_on_whether_the_model_was_loaded_before(monkeypatch):
    task = load_study_task("subj")
    monkeypatch.setattr(models_module, "_BASE", {})  # as in a fresh process: the first call loads the model
    first = prepare_model("minilm", task, 16, seed=3).model.classifier.weight.detach().clone()
    again = prepare_model("minilm", task, 16, seed=3).model.classifier.weight.detach()
    assert torch.equal(first, again)
    assert not torch.equal(first, prepare_model("minilm", task, 16, seed=4).model.classifier.weight.detach())


# --- 2: tokens/s without the warm-up steps (kernel JIT and autotuning), the median step beside ------------------

def test_throughput_leaves_out_the_warm_up_steps():
    seconds = [10.0, 5.0, 5.0, 1.0, 1.0, 1.0, 2.0]   # three slow warm-up steps, one retune at a new length
    speed = cell_module.throughput(seconds, [100] * 7)
    assert speed["warmup_steps"] == cell_module.WARMUP_STEPS == 3 and speed["timed_steps"] == 4
    assert speed["tokens_per_second"] == pytest.approx(400 / 5)
    assert speed["step_seconds_median"] == 1.0 and speed["step_seconds_mean"] == pytest.approx(5 / 4)
    assert speed["train_seconds"] == pytest.approx(25.0) and speed["train_tokens"] == 700
    short = cell_module.throughput([3.0, 1.0], [10, 10])   # too few steps: all but the last are warm-up
    assert short["timed_steps"] == 1 and short["tokens_per_second"] == pytest.approx(10.0)


def test_a_cell_records_timed_steps_median_step_and_both_memory_peaks(stand_in_model):
    result = run_cell(CellSpec("minilm", "subj", "32-per-class", "lora", "peft", 0), SETTINGS, torch.device("cpu"))
    assert result["status"] == "done", result.get("traceback")
    assert result["warmup_steps"] == 3 and result["timed_steps"] == SETTINGS.steps - 3
    assert result["train_tokens"] == 3 * SETTINGS.batch_size * SETTINGS.steps
    assert result["step_seconds_median"] > 0 and result["peak_memory_gib"] > 0
    assert result["eval_peak_memory_gib"] > 0


# --- 4: peak memory: the training steps', evaluation apart; the best state is kept on the CPU -------------------

def test_cuda_peak_of_the_training_steps_leaves_evaluation_out(monkeypatch):
    allocator = {"peak": 0}
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: allocator.update(peak=0))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: allocator["peak"])
    memory = cell_module._PeakMemory(torch.device("cuda"))
    for step_peak in (2 * 2**30, 3 * 2**30):
        memory.start()
        allocator["peak"] = step_peak
        memory.sample("train")
    memory.start()
    allocator["peak"] = 7 * 2**30   # a large evaluation batch
    memory.sample("eval")
    assert memory.peaks == {"train": 3.0, "eval": 7.0}


def test_best_state_is_a_cpu_copy():
    p = nn.Parameter(torch.ones(3))
    state = cell_module._snapshot([("w", p)])
    assert state["w"].device.type == "cpu" and state["w"].data_ptr() != p.data_ptr()
    with torch.no_grad():
        p.add_(1)
    assert torch.equal(state["w"], torch.ones(3))


# --- 5: resume reruns cells of another device or code version; the report names the devices ---------------------

def test_finished_cells_are_reused_only_with_the_same_provenance(tmp_path, monkeypatch):
    path = tmp_path / "c.json"
    for name in KERNEL_ENV:  # the FASTFT_* variables that choose kernels are recorded only when set
        monkeypatch.delenv(name, raising=False)
    here = runner_module.provenance(1234)
    assert set(here) == {"device_name", "threads", "fastft_version", "git_commit", "split_seed", "versions"}
    monkeypatch.setenv("FASTFT_LORA_BACKEND", "triton")
    assert runner_module.provenance(1234) == {**here, "kernel_env": {"FASTFT_LORA_BACKEND": "triton"}}
    write_json_atomic(path, {"status": "done", "settings": asdict(SETTINGS), "provenance": here})
    assert _finished(path, SETTINGS, here)["status"] == "done"
    for change in ({"device_name": "NVIDIA H200"}, {"threads": here["threads"] + 1}, {"fastft_version": "0.0.1"},
                   {"git_commit": "0" * 40}, {"split_seed": 1}, {"kernel_env": {"FASTFT_LORA_BACKEND": "triton"}},
                   {"versions": {**here["versions"], "peft": "0.0.1"}}):
        assert _finished(path, SETTINGS, {**here, **change}) is None
    write_json_atomic(path, {"status": "done", "settings": asdict(SETTINGS)})   # written before provenance
    assert _finished(path, SETTINGS, here) is None


def test_resume_on_another_device_reruns_and_the_report_lists_devices(tmp_path, monkeypatch):
    calls = []

    def fake_run_cell(spec, settings):
        calls.append(spec.key)
        return {"key": spec.key, **asdict(spec), "settings": asdict(settings), "status": "done",
                "metric": "accuracy", "test_metric": 0.9, "test_accuracy": 0.9, "test_macro_f1": 0.9,
                "trainable_parameters": 10, "total_parameters": 100, "tokens_per_second": 5.0,
                "peak_memory_gib": 1.0, "peak_memory_kind": "process RSS, sampled per step", "wall_seconds": 1.0}

    monkeypatch.setattr(runner_module, "run_cell", fake_run_cell)
    monkeypatch.setattr(runner_module, "load_study_task", lambda name: _toy_task())
    config = StudyConfig(methods=("lora",), tasks=("subj",), models=("minilm",), regimes=("32-per-class",), seeds=1,
                         steps=2, with_peft=False, output_dir=str(tmp_path))
    runner_module.run_study(config, progress=False, log=lambda line: None)
    runner_module.run_study(config, progress=False, log=lambda line: None)
    assert len(calls) == 1   # same device and code: read back
    monkeypatch.setattr(runner_module, "device_name", lambda device: "NVIDIA H200")
    logged = []
    results = runner_module.run_study(config, progress=False, log=logged.append)
    assert len(calls) == 2 and results["resumed_cells"] == 0
    assert any("1 finished cells rerun" in line and "NVIDIA H200" in line for line in logged)
    assert results["cells"][0]["provenance"]["device_name"] == "NVIDIA H200"
    report = write_report(results, tmp_path)["report"].read_text()
    assert "Cells ran on: NVIDIA H200 (1 cells)." in report


# --- 6: texts that differ only in case, spacing or punctuation are one text -------------------------------------

def test_unique_texts_matches_normalised_texts_and_drops_conflicts():
    rows = [("Ok lar... Joking wif u oni...", 0), ("ok lar joking wif u oni", 0), ("OK  LAR, joking wif u oni!", 0),
            ("Free entry in 2 a wkly comp", 1), ("free entry in 2 a wkly comp!!", 0),
            ("ｆｕｌｌ width", 1), ("Full_Width", 1), ("Straße", 1), ("STRASSE", 1)]
    assert unique_texts(rows) == [("Ok lar... Joking wif u oni...", 0), ("ｆｕｌｌ width", 1), ("Straße", 1)]


# --- 7: macro-F1 over the classes present, for the cells and the majority floor alike --------------------------

def test_macro_f1_ignores_classes_absent_from_labels_and_predictions():
    labels = [0, 0, 3, 3]   # a capped split of a 6-class task: 2 classes present
    assert macro_f1(labels, labels) == 1.0
    assert macro_f1([0, 0, 0, 0], labels) == pytest.approx((2 / 3) / 2)
    assert macro_f1([0, 0, 5, 3], labels) == pytest.approx((1 + 2 / 3 + 0) / 3)   # a predicted absent class counts


def test_majority_floor_averages_over_the_classes_present():
    test = [("x", 0), ("y", 0), ("z", 1), ("w", 0)]   # class 2 absent from the tested rows
    task = _toy_task(test_rows=test, label_words=(" a", " b", " c"))
    floor = majority_baseline(task)
    assert floor["accuracy"] == 0.75
    assert floor["macro_f1"] == pytest.approx((2 * 3 / (3 + 4)) / 2)


# --- 3 and 8: MiniLM's adapter targets the FFN outputs; fastft prefix on MiniLM and peft QLoRA are not run -----

def test_minilm_bottleneck_adapter_follows_each_ffn_output_only():
    from fastft.integration.methods import apply_method
    from fastft.integration.methods.adapter.layer import AdapterAfter

    prepared = prepare_model("minilm", load_study_task("subj"), 16, seed=0)
    model = apply_method(prepared.model, "adapter", prepared.options)
    wrapped = [n for n, m in model.named_modules() if isinstance(m, AdapterAfter)]
    assert len(wrapped) == 6 and all(n.endswith(".output.dense") and "attention" not in n for n in wrapped)
    batch = prepared.collate([("a fine film", 1), ("dull", 0)])
    assert prepared.class_logits(model, batch).shape == (2, 2)


def test_minilm_fastft_prefix_is_unavailable_without_running(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(runner_module, "run_cell", lambda spec, settings: calls.append(spec) or {})
    monkeypatch.setattr(runner_module, "load_study_task", lambda name: _toy_task())
    config = StudyConfig(methods=("prefix",), tasks=("subj",), models=("minilm",), regimes=("32-per-class",),
                         seeds=1, steps=2, with_peft=False, output_dir=str(tmp_path))
    for _ in range(2):   # nor on resume
        results = runner_module.run_study(config, progress=False, log=lambda line: None)
        assert not calls
        cell = results["cells"][0]
        assert cell["status"] == "unavailable" and "BERT encoder" in cell["reason"]
    from fastft.apps.study.command import describe_plan

    assert "unavailable, recorded without running: 1 minilm prefix (fastft)" in describe_plan(config)


def test_qlora_has_no_peft_anchor():
    cells = plan(StudyConfig(methods=("qlora", "lora"), tasks=("subj",), models=("minilm",),
                             regimes=("32-per-class",), seeds=1))
    assert sorted((s.method, s.implementation) for s, _ in cells) == [("lora", "fastft"), ("lora", "peft"),
                                                                      ("qlora", "fastft")]
