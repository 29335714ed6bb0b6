"""The study's plan and its resumable runner.

Every cell's result is a JSON file under `<output>/cells/`, written atomically when the cell ends; on a
restart the finished cells ("done", or "diverged": their settings' outcome, which a rerun repeats) whose
settings and provenance (device, threads, fastft version and commit, library and model/data package versions, split
seed) match are read back, not rerun; the others are rerun, and the run says how many and why. Cells
that were unavailable or failed are tried again (a method that has landed since then runs); combinations known
not to run (UNAVAILABLE) are recorded without running. After each cell the combined `results.json` is
rewritten; the report is written at the end.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from fastft.apps.datasets import DATA_PACKAGES
from fastft.apps.provenance import device_name, git_commit, kernel_environment, library_versions
from fastft.apps.study.cell import CellSettings, CellSpec, default_device, run_cell
from fastft.apps.study.models import HEAD_FAMILIES, MINILM_POSITIONS, MODEL_FAMILIES, MODEL_PACKAGES, family_problem
from fastft.apps.study.tasks import REGIMES, STUDY_TASKS, load_study_task, majority_baseline, tested_split
from fastft.files import atomic_write, lock_folder, output_dir_problem, output_names_problem, remove_temporaries_in
from fastft.integration.methods import METHODS

# Learning rates per method, (MiniLM, SmolLM2). Full fine-tuning moves every pretrained weight, so it takes
# the smallest steps (2e-5…1e-4; the smaller, deeper SmolLM2 the lower end). LoRA-family and bottleneck
# adapters start from a zero update and train ~1% of the weights: 1e-3. IA3 scales activations around 1:
# 3e-3. Prompt and prefix tuning train a few embedding-sized vectors that must move far: 1e-2…3e-2.
LR_DEFAULTS = {
    "full": (1e-4, 3e-5),
    "lora": (1e-3, 1e-3),
    "qlora": (1e-3, 1e-3),
    "dora": (1e-3, 1e-3),
    "adapter": (1e-3, 1e-3),
    "ia3": (3e-3, 3e-3),
    "prefix": (1e-2, 1e-2),
    "prompt": (3e-2, 3e-2),
}
HEAD_LR = 3e-3  # MiniLM's fresh classification head, the same under every method so only the method differs

# Steps per cell by regime (batch 16): the 32-per-class sets (64–192 rows) get ~5–12 epochs; the full
# training sets are sampled for 150 steps (2,400 rows: about one epoch of the smaller tasks, a quarter of MR).
STEPS_DEFAULT = {"32-per-class": 60, "full": 150}
# peft has no full fine-tuning and no bottleneck adapter, and its QLoRA needs a bitsandbytes-quantized model
# (apply_method refuses it): those cells get no peft anchor.
NO_PEFT_ANCHOR = ("full", "adapter", "qlora")
# the distributions whose version a cell records (its provenance): the libraries a cell runs and the packages its
# model weights and task data come from
STUDY_PACKAGES = ("torch", "triton", "transformers", "peft", "accelerate", "bitsandbytes",
                  *(name for names in MODEL_PACKAGES.values() for name in names), *DATA_PACKAGES)
# what a study writes into its --output-dir: files, then folders
OUTPUT_FILES, OUTPUT_FOLDERS = ("results.json", "report.md"), ("cells", "plots")
# (model, method, implementation) that cannot run, known before running: recorded "unavailable" with the reason
# and never run (a retry would fail the same way on every resume). Remove an entry when its method lands.
UNAVAILABLE = {
    ("minilm", "prefix", "fastft"): "fastft prefix tuning needs a decoder whose attention layers carry layer_idx "
                                    "(Llama family); MiniLM is a BERT encoder",
}


@dataclass
class StudyConfig:
    methods: tuple[str, ...] = METHODS
    tasks: tuple[str, ...] = STUDY_TASKS
    models: tuple[str, ...] = MODEL_FAMILIES
    regimes: tuple[str, ...] = REGIMES
    seeds: int = 3
    steps: int | None = None          # None: STEPS_DEFAULT per regime
    batch_size: int = 16
    max_length: int = 128
    lr: dict = field(default_factory=dict)  # method -> lr, overriding LR_DEFAULTS for both families
    head_lr: float = HEAD_LR
    evals: int = 6                    # dev evaluations per cell, evenly spread (at most one a step)
    max_dev: int | None = None        # None: the whole dev split
    max_test: int | None = None       # None: the whole test split
    with_peft: bool = True
    output_dir: str = "runs/study"
    quick: bool = False

    def validate(self) -> None:
        for name, values, allowed in (("methods", self.methods, METHODS), ("tasks", self.tasks, STUDY_TASKS),
                                      ("models", self.models, MODEL_FAMILIES), ("regimes", self.regimes, REGIMES)):
            bad = [v for v in values if v not in allowed]
            if bad or not values:
                raise ValueError(f"--{name}: expected one or more of {', '.join(allowed)}, got {list(values)}")
        for name in ("seeds", "batch_size", "evals"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"--steps must be at least 1, got {self.steps}")
        if self.max_length < 8:
            raise ValueError(f"--max-length must be at least 8, got {self.max_length}")
        if "minilm" in self.models and self.max_length > MINILM_POSITIONS:  # every long-text cell failed in torch
            raise ValueError(f"--max-length {self.max_length}: MiniLM (--models minilm) reads at most "
                             f"{MINILM_POSITIONS} tokens; give --max-length {MINILM_POSITIONS} or less")
        bad_lr = [m for m in self.lr if m not in METHODS]
        if bad_lr:
            raise ValueError(f"--lr: expected positive rates for methods among {', '.join(METHODS)}, got {self.lr}")
        for method, rate in self.lr.items():
            if not _finite_positive(rate):
                raise ValueError(f"--lr must be a finite number > 0, got {rate} (for {method})")
        if not _finite_positive(self.head_lr):
            raise ValueError(f"--head-lr must be a finite number > 0, got {self.head_lr}")
        # the names below cells/ and plots/ too: one of the other kind failed the run after its cells had trained
        plots = ["score_vs_params.png", "score_vs_tokens_per_second.png",
                 *(f"tasks_{model}-{regime}.png" for model in self.models for regime in self.regimes)]
        problem = (output_dir_problem(self.output_dir)
                   or output_names_problem(self.output_dir, OUTPUT_FILES, OUTPUT_FOLDERS)
                   or output_names_problem(Path(self.output_dir, "cells"), [f"{s.key}.json" for s, _ in plan(self)])
                   or output_names_problem(Path(self.output_dir, "plots"), plots))
        if problem:
            raise ValueError(problem)


def check_inputs(config: StudyConfig) -> dict:
    """Each task of the study loaded (returned by name) and each model's package found, before any cell runs; raises
    ValueError naming --tasks or --models and the package to install (a missing one failed every cell)."""
    for model in config.models:
        problem = family_problem(model)
        if problem:
            raise ValueError(problem)
    tasks = {}
    for name in config.tasks:
        try:
            tasks[name] = load_study_task(name)
        except FileNotFoundError as err:
            raise ValueError(f"--tasks {name}: {err}") from None
    return tasks


def _finite_positive(rate: float) -> bool:
    return math.isfinite(rate) and rate > 0   # `rate <= 0` alone lets NaN through


def quick_config(**overrides) -> StudyConfig:
    """`--quick`: MiniLM, two tasks, five methods, 32 per class, one seed, a few short steps."""
    values = dict(methods=("lora", "full", "ia3", "prompt", "dora"), tasks=("subj", "sms-spam"),
                  models=("minilm",), regimes=("32-per-class",), seeds=1, steps=16, batch_size=8,
                  max_length=32, evals=2, max_dev=32, max_test=128, quick=True, output_dir="runs/study-quick")
    values.update(overrides)
    return StudyConfig(**values)


def learning_rate(config: StudyConfig, method: str, model: str) -> float:
    if method in config.lr:
        return config.lr[method]
    return LR_DEFAULTS[method][MODEL_FAMILIES.index(model)]


def plan(config: StudyConfig) -> list[tuple[CellSpec, CellSettings]]:
    """Every cell, ordered so each (model, task, regime) finishes all its methods before the next starts."""
    cells = []
    for model in config.models:
        for regime in config.regimes:
            steps = config.steps or STEPS_DEFAULT[regime]
            for task in config.tasks:
                for seed in range(config.seeds):
                    for method in config.methods:
                        settings = CellSettings(steps=steps, batch_size=config.batch_size,
                                                max_length=config.max_length,
                                                lr=learning_rate(config, method, model),
                                                head_lr=config.head_lr if model in HEAD_FAMILIES else None,
                                                evals=config.evals,
                                                max_dev=config.max_dev, max_test=config.max_test)
                        implementations = ["fastft"]
                        if config.with_peft and method not in NO_PEFT_ANCHOR:
                            implementations.append("peft")
                        for implementation in implementations:
                            cells.append((CellSpec(model, task, regime, method, implementation, seed), settings))
    return cells


def unavailable_reason(spec: CellSpec) -> str | None:
    return UNAVAILABLE.get((spec.model, spec.method, spec.implementation))


def _unavailable_result(spec: CellSpec, settings: CellSettings, reason: str) -> dict:
    return {"key": spec.key, **asdict(spec), "settings": asdict(settings), "status": "unavailable",
            "reason": reason, "wall_seconds": 0.0}


def provenance(split_seed: int) -> dict:
    """What a cell's result depends on beyond its spec and settings: where, with how many CPU threads (tokens/s on
    a CPU), by which code and library versions (torch, transformers, peft, ..., the model and data packages) it ran,
    and the split of its task. A stored cell whose provenance differs is rerun on resume, so one report never mixes
    cells measured under different --threads, FASTFT_* kernel choices or package versions."""
    import torch

    import fastft

    out = {"device_name": device_name(default_device()), "threads": torch.get_num_threads(),
           "fastft_version": fastft.__version__, "git_commit": git_commit(), "split_seed": split_seed,
           "versions": library_versions(STUDY_PACKAGES)}
    kernels = kernel_environment()
    return {**out, "kernel_env": kernels} if kernels else out  # absent when none is set: older cells still match


def write_json_atomic(path: Path, data) -> None:
    atomic_write(path, json.dumps(data, indent=1))


def cell_path(output_dir: Path, spec: CellSpec) -> Path:
    return output_dir / "cells" / f"{spec.key}.json"


FINISHED = ("done", "diverged")   # read back on resume; "unavailable" and "failed" cells are tried again


def _stored(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def differences(old: dict, new: dict) -> str | None:
    """'name old → new' for each entry that differs (of a dict in both, the versions, each of its entries that
    differs), comma-separated; None when none does."""
    changes = []
    for k in dict.fromkeys([*new, *old]):
        was, now = old.get(k), new.get(k)
        if isinstance(was, dict) and isinstance(now, dict):
            changes += [f"{name} {was.get(name)!r} → {now.get(name)!r}" for name in dict.fromkeys([*now, *was])
                        if was.get(name) != now.get(name)]
        elif was is None and isinstance(now, dict):   # a cell written before they were recorded
            changes.append(f"{k} not recorded")
        elif was != now:
            changes.append(f"{k} {was!r} → {now!r}")
    return ", ".join(changes) or None


def provenance_change(result: dict, expected: dict) -> str | None:
    """How a stored cell's provenance differs from this run's (None: it does not)."""
    return differences(result.get("provenance") or {}, expected)


def _finished(path: Path, settings: CellSettings, expected: dict | None = None) -> dict | None:
    """The cell's stored result when it finished (FINISHED) under the same settings and, when `expected` is
    given, the same provenance; else None (run it)."""
    result = _stored(path)
    if result is None or result.get("status") not in FINISHED or result.get("settings") != asdict(settings):
        return None
    if expected is not None and provenance_change(result, expected):
        return None
    return result


LOCK_NAME = ".fastft-study.lock"


class OutputDirInUse(ValueError):
    """Another study holds the output folder (or its lock cannot be taken): the message says what to do."""


@contextlib.contextmanager
def holding_output_dir(output_dir: str | os.PathLike):
    """One study per output folder, held while the `with` block runs (`fastft study`: the run and its report): a
    second study there ran every cell again beside the first. Entering, it removes the temporaries killed runs left
    there (a plot's stayed for good once the next plan no longer drew that plot). OutputDirInUse when another holds
    it."""
    out = Path(output_dir)
    lock, problem = lock_folder(out, LOCK_NAME, "fastft study run")
    if problem is not None:
        raise OutputDirInUse(problem)
    try:
        for folder in (out, out / "cells", out / "plots"):
            if folder.is_dir():
                remove_temporaries_in(folder)
        yield
    finally:
        lock.close()


def run_study(config: StudyConfig, *, progress: bool = True, log=print) -> dict:
    """Run (or resume) the study; returns the combined results, also written to `<output>/results.json`."""
    config.validate()
    tasks = {name: {**task.summary(), "tested": tested_split(task, config.max_test),
                    "majority": majority_baseline(task, config.max_test)}
             for name, task in check_inputs(config).items()}
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    # an earlier run's report describes results.json no more once this run rewrites it: stopped midway, the old
    # report read as a finished study beside results marked incomplete. Replaced (written through a user's link, as
    # every write of it) until the report is drawn at the end
    if (out / "report.md").exists():
        atomic_write(out / "report.md", f"# fastft study: running\n\nThis report is drawn again when the run ends; "
                     f"for the cells so far: `python -m fastft.apps.study.report {out / 'results.json'}`\n")
    cells = plan(config)
    results, outcomes, changes = [], Counter(), {"settings": [], "provenance": []}
    log(f"fastft study: {len(cells)} cells ({len(config.models)} models × {len(config.tasks)} tasks × "
        f"{len(config.regimes)} regimes × {config.seeds} seeds × methods/implementations) → {out}")
    bar = tqdm(cells, desc="study", unit="cell", disable=not progress, dynamic_ncols=True)
    for spec, settings in bar:
        bar.set_postfix_str(f"{spec.model} {spec.task} {spec.method}/{spec.implementation} s{spec.seed}")
        result, outcome, change = _cell_result(out, spec, settings, provenance(tasks[spec.task]["split_seed"]))
        outcomes[outcome] += 1
        if change:
            changes[change[0]].append(change[1])
        results.append(result)
        combined = _combined(config, tasks, results, outcomes["resumed"], len(cells))
        write_json_atomic(out / "results.json", combined)
    for kind, why in (("settings", "their settings changed"),
                      ("provenance", "they ran on another device, thread count, code or package versions")):
        if changes[kind]:
            log(f"{len(changes[kind])} finished cells rerun: {why} ({changes[kind][0]})")
    log(f"{outcomes['resumed']} finished cells read back, {outcomes['run']} run"
        + (f", {outcomes['unavailable']} unavailable (not run)" if outcomes["unavailable"] else ""))
    diverged = sum(r["status"] == "diverged" for r in results)
    if diverged:
        log(f"{diverged} cells diverged (non-finite training loss): no score, see the report's cells without a score")
    return combined


def _cell_result(out: Path, spec: CellSpec, settings: CellSettings,
                 expected: dict) -> tuple[dict, str, tuple[str, str] | None]:
    """(result, outcome, change): the cell known unavailable, read back (finished with the same settings and
    provenance) or run now; `change` says why a finished cell runs again: ("settings" or "provenance", what
    changed)."""
    path = cell_path(out, spec)
    reason = unavailable_reason(spec)
    if reason is not None:
        result = {**_unavailable_result(spec, settings, reason), "provenance": expected}
        write_json_atomic(path, result)
        return result, "unavailable", None
    result = _finished(path, settings, expected)
    if result is not None:
        return result, "resumed", None
    why = _rerun_reason(_stored(path), settings, expected)
    change = (why[0], f"{spec.key}: {why[1]}") if why else None
    result = {**run_cell(spec, settings), "provenance": expected}
    write_json_atomic(path, result)
    return result, "run", change


def _rerun_reason(stored: dict | None, settings: CellSettings, expected: dict) -> tuple[str, str] | None:
    """Why a stored finished cell is not read back: ("settings", what changed) or ("provenance", what changed);
    None when there is no finished cell."""
    if stored is None or stored.get("status") not in FINISHED:
        return None
    changed = differences(stored.get("settings") or {}, asdict(settings))
    if changed:
        return "settings", changed
    return "provenance", provenance_change(stored, expected)


def _combined(config: StudyConfig, tasks: dict, results: list[dict], resumed: int, planned: int) -> dict:
    """results.json: written after every cell, so a study stopped midway leaves the cells so far, marked
    incomplete (`complete`, `planned_cells`: a redraw says so, as bench's table does)."""
    import platform

    import torch

    slim = [{k: v for k, v in r.items() if k not in ("traceback", "train_losses", "dev_curve")} for r in results]
    return {"config": asdict(config), "tasks": tasks, "cells": slim, "resumed_cells": resumed,
            "planned_cells": planned, "complete": len(results) == planned,
            "environment": {"torch": torch.__version__, "python": platform.python_version(),
                            "device": default_device().type, "device_name": device_name(default_device()),
                            "threads": torch.get_num_threads(), "versions": library_versions(STUDY_PACKAGES)}}
