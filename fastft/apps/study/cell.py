"""One cell of the study: (model family, task, regime, method, implementation, seed) → one result dict.

A cell trains a fresh copy of the model with the method for a fixed number of steps, evaluates on the dev
split `evals` times (evenly spread, the last at the last step), keeps the best dev state on the CPU (only the
trainable tensors change, so only they are copied) and reports the test metrics of that state. Beside accuracy it
measures the cost: training tokens/s (real tokens, warm-up steps and dev evaluation excluded) with the median step
time, peak memory of the training steps (evaluation's apart), trainable parameters, wall time.

A method that is not implemented (yet) is recorded as status "unavailable" with the reason; a cell whose
training loss became non-finite (NaN or inf) stops there and is "diverged", with the step and the losses so
far; any other error is "failed" with the error. None of them carries a test score.
"""
from __future__ import annotations

import math
import random
import statistics
import time
import traceback
import uuid
from dataclasses import asdict, dataclass

import torch

from fastft.apps.host_memory import rss_bytes
from fastft.apps.provenance import device_name
from fastft.apps.study.models import count_parameters, prepare_model, unfreeze_head
from fastft.apps.study.tasks import capped_rows, load_study_task, tested_rows, training_rows
from fastft.integration.methods import apply_method


@dataclass(frozen=True)
class CellSpec:
    model: str
    task: str
    regime: str
    method: str
    implementation: str
    seed: int

    @property
    def key(self) -> str:
        return f"{self.model}__{self.task}__{self.regime}__{self.method}__{self.implementation}__seed{self.seed}"


@dataclass(frozen=True)
class CellSettings:
    steps: int
    batch_size: int
    max_length: int
    lr: float            # the method's parameters (and, for full fine-tuning, the whole model)
    head_lr: float | None  # the fresh classification head (MiniLM), the same under every method; None: no head
    evals: int           # dev evaluations, spread evenly; the last at the last step
    max_dev: int | None  # evaluate on the first max_dev dev rows (the split itself is fixed)
    max_test: int | None
    eval_batch_size: int = 64


class Diverged(Exception):
    """The training loss became non-finite: the cell stops, without a score."""

    def __init__(self, reason: str, losses: list[float]):
        super().__init__(reason)
        self.losses = losses


def evaluation_steps(steps: int, evals: int) -> set[int]:
    """The steps after which the dev split is evaluated: `evals` of them (every step when evals >= steps), evenly
    spread, the last one at the last step."""
    return {step for step in range(1, steps + 1) if step * evals // steps > (step - 1) * evals // steps}


def check_loss(losses: list[float], settings: CellSettings) -> None:
    """Raises Diverged when the latest training loss (losses[-1], of step len(losses)) is not finite."""
    if not math.isfinite(losses[-1]):
        head = "" if settings.head_lr is None else f", head lr {settings.head_lr:g}"
        raise Diverged(f"training loss {losses[-1]} at step {len(losses)} of {settings.steps} (lr {settings.lr:g}"
                       f"{head})", losses)


def macro_f1(predictions: list[int], labels: list[int]) -> float:
    """Mean F1 over the classes present in the labels or the predictions (sklearn's default): a class absent from
    both (possible with --max-test/--max-dev caps) has no F1 and must not count as 0."""
    scores = []
    for c in sorted(set(labels) | set(predictions)):
        tp = sum(p == c and y == c for p, y in zip(predictions, labels))
        fp = sum(p == c and y != c for p, y in zip(predictions, labels))
        fn = sum(p != c and y == c for p, y in zip(predictions, labels))
        scores.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return sum(scores) / len(scores) if scores else 0.0


def _to(batch: dict, device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


@torch.no_grad()
def evaluate(prepared, model, rows, batch_size: int, device, autocast) -> dict:
    model.eval()
    predictions, labels = [], []
    for i in range(0, len(rows), batch_size):
        batch = _to(prepared.collate(rows[i:i + batch_size]), device)
        with autocast():
            predictions += prepared.class_logits(model, batch).argmax(-1).tolist()
        labels += batch["labels"].tolist()
    model.train()
    accuracy = sum(p == y for p, y in zip(predictions, labels)) / len(labels)
    return {"accuracy": accuracy, "macro_f1": macro_f1(predictions, labels), "examples": len(labels)}


class _PeakMemory:
    """Peak memory of the training steps, and apart from it of the dev/test evaluations. CUDA: the allocator's
    peak, reset before each step and each evaluation so that one phase's peak never counts in the other. CPU: the
    process's resident set, sampled after each step and each evaluation (process-wide: not separable)."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"
        self.kind = "cuda max allocated" if self.cuda else "process RSS, sampled per step"
        self.device = device
        self.peaks = {"train": 0.0, "eval": 0.0}

    def start(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)

    def sample(self, phase: str) -> None:
        now = torch.cuda.max_memory_allocated(self.device) / 2**30 if self.cuda else rss_bytes() / 2**30
        self.peaks[phase] = max(self.peaks[phase], now)


# The first steps of a cell compile and autotune kernels (Triton JIT on a GPU), which is not the method's speed:
# tokens/s counts the steps after the first WARMUP_STEPS (all steps when a cell has no more). Autotuning also
# recurs once per new padded-length bucket later on; the median step time, recorded beside, does not see it.
WARMUP_STEPS = 3


def throughput(step_seconds: list[float], step_tokens: list[int]) -> dict:
    """Training speed from the per-step times and real-token counts, warm-up steps left out."""
    skip = min(WARMUP_STEPS, len(step_seconds) - 1)
    seconds, tokens = step_seconds[skip:], step_tokens[skip:]
    return {"tokens_per_second": sum(tokens) / sum(seconds), "step_seconds_mean": sum(seconds) / len(seconds),
            "step_seconds_median": statistics.median(seconds), "timed_steps": len(seconds), "warmup_steps": skip,
            "train_tokens": sum(step_tokens), "train_seconds": sum(step_seconds)}


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _snapshot(named) -> dict:
    """The trainable tensors, copied to the CPU: the best state must not add to (or double, while the previous
    best is still held) the device memory the cell measures."""
    return {n: p.detach().to("cpu", copy=True) for n, p in named}


def _schedule(steps: int):
    warmup = max(1, steps // 10)
    return lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))


def _build(spec: CellSpec, settings: CellSettings, task, device):
    """The cell's model with its method applied, on `device`: (prepared, model, trainable, total, named, optimizer,
    schedule)."""
    prepared = prepare_model(spec.model, task, settings.max_length, spec.seed)
    torch.manual_seed(spec.seed)  # the method's initialisation draws from here: the same for fastft and peft
    model = apply_method(prepared.model, spec.method, prepared.options, implementation=spec.implementation)
    unfreeze_head(model, prepared.head_names)
    model.to(device)
    trainable, total = count_parameters(model)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise RuntimeError(f"method {spec.method!r} left no trainable parameters")
    head = [p for n, p in named if any(h in n for h in prepared.head_names)]
    body = [p for n, p in named if not any(h in n for h in prepared.head_names)]
    groups = [{"params": body, "lr": settings.lr}] + ([{"params": head, "lr": settings.head_lr}] if head else [])
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(settings.steps))
    return prepared, model, trainable, total, named, optimizer, schedule


def _train_and_test(spec: CellSpec, settings: CellSettings, device) -> dict:
    task = load_study_task(spec.task)
    train_rows = training_rows(task, spec.regime, spec.seed)
    dev_rows = capped_rows(task.dev, settings.max_dev)
    test_rows = tested_rows(task, settings.max_test)
    prepared, model, trainable, total, named, optimizer, schedule = _build(spec, settings, task, device)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else (
        lambda: torch.autocast("cpu", enabled=False))

    order = torch.Generator().manual_seed(spec.seed)

    def shuffled_forever():  # a fresh seeded permutation each epoch
        while True:
            yield from torch.randperm(len(train_rows), generator=order).tolist()

    indices = shuffled_forever()

    def evaluated(rows) -> dict:
        memory.start()
        result = evaluate(prepared, model, rows, settings.eval_batch_size, device, autocast)
        memory.sample("eval")
        return result

    memory = _PeakMemory(device)
    model.train()
    step_seconds, step_tokens, losses, dev_curve = [], [], [], []
    best = {"metric": -1.0, "step": 0, "state": None}
    evaluate_at = evaluation_steps(settings.steps, settings.evals)
    for step in range(1, settings.steps + 1):
        batch = _to(prepared.collate([train_rows[next(indices)] for _ in range(settings.batch_size)]), device)
        memory.start()
        _sync(device)
        start = time.perf_counter()
        with autocast():
            loss = prepared.loss(model, batch)
        loss.backward()
        memory.sample("train")
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        _sync(device)
        step_seconds.append(time.perf_counter() - start)
        memory.sample("train")
        step_tokens.append(int(batch["attention_mask"].sum()))
        losses.append(loss.item())
        check_loss(losses, settings)
        if step in evaluate_at:
            dev = evaluated(dev_rows)
            dev_curve.append({"step": step, **dev})
            if dev[task.metric] > best["metric"]:
                best = {"metric": dev[task.metric], "step": step, "state": None}  # the old copy goes first
                best["state"] = _snapshot(named)
    with torch.no_grad():
        for n, p in named:
            p.copy_(best["state"][n])
    test = evaluated(test_rows)
    return {
        "test_accuracy": test["accuracy"], "test_macro_f1": test["macro_f1"], "test_examples": test["examples"],
        "metric": task.metric, "test_metric": test[task.metric],
        "dev_best": best["metric"], "dev_best_step": best["step"], "dev_examples": len(dev_rows),
        "dev_curve": dev_curve, "train_losses": losses, "train_examples": len(train_rows),
        **throughput(step_seconds, step_tokens),
        "peak_memory_gib": memory.peaks["train"], "eval_peak_memory_gib": memory.peaks["eval"],
        "peak_memory_kind": memory.kind, "trainable_parameters": trainable, "total_parameters": total,
    }


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def run_cell(spec: CellSpec, settings: CellSettings, device: torch.device | None = None) -> dict:
    """Run one cell; never raises for a method that cannot run (the result says why)."""
    device = device or default_device()
    result = {"key": spec.key, **asdict(spec), "settings": asdict(settings), "device": str(device),
              "device_name": device_name(device),
              "run_id": uuid.uuid4().hex, "started_at": time.time()}
    random.seed(spec.seed)
    start = time.perf_counter()
    try:
        result.update(status="done", **_train_and_test(spec, settings, device))
    except NotImplementedError as e:
        result.update(status="unavailable", reason=str(e) or "not implemented")
    except Diverged as e:
        result.update(status="diverged", reason=str(e), train_losses=e.losses)
    except Exception as e:  # noqa: BLE001 — one broken cell must not stop the study; the report shows it
        result.update(status="failed", reason=f"{type(e).__name__}: {e}", traceback=traceback.format_exc())
    result["wall_seconds"] = time.perf_counter() - start
    result["finished_at"] = time.time()
    return result
