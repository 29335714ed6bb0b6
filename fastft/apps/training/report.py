"""A finished run's report beside its metrics.json: report.md (settings, evaluations, speed, memory) and
losses.png (the training loss per step, the evaluations' loss on top; when matplotlib is installed), both written
atomically.

`python -m fastft.apps.training.report OUTPUT_DIR` draws them again from OUTPUT_DIR/metrics.json."""
from __future__ import annotations

import importlib.util
import io
import json
import math
import sys
from pathlib import Path

from fastft.apps.training.config import reads_setting
from fastft.files import atomic_write

# the settings a reader needs first (those the run's method reads: no rank for ia3); the whole config is in
# metrics.json and config.yaml
_SETTINGS = ("model", "method", "objective", "task", "data", "rank", "steps", "batch_size", "grad_accum",
             "max_length", "lr", "schedule", "mixed_precision", "distributed", "compile")


def _number(value) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        if not math.isfinite(value):
            return "—"
        return f"{value:,.0f}" if abs(value) >= 1e4 else f"{value:.4g}"  # 123,457 tokens/s, not 1.235e+05
    return str(value)


def _evaluations(metrics: dict) -> list[tuple[str, dict]]:
    rows = [("before training", metrics.get("eval_before")), ("quantized, before training",
                                                              metrics.get("eval_quantized"))]
    rows += [(f"step {e['step']}", e) for e in metrics.get("evals") or []]
    rows.append(("after training", metrics.get("eval_after")))
    rows += [(f"merged ({name})", result) for name, result in (metrics.get("eval_merged") or {}).items()]
    return [(name, result) for name, result in rows if result]


def report_markdown(metrics: dict) -> str:
    config = metrics.get("config", {})
    lines = ["# fastft train", "", "| setting | value |", "|---|---|"]
    shown = [key for key in _SETTINGS if config.get(key) is not None and reads_setting(config, key)  # no rank for ia3
             and not (key == "task" and config.get("data") is not None)]  # --data replaces the built-in task
    lines += [f"| {key.replace('_', '-')} | {_number(config.get(key))} |" for key in shown]
    lines += [f"| device | {metrics.get('device')} × {metrics.get('processes', 1)} process(es) |",
              f"| trainable parameters | {metrics.get('trainable_parameters', 0):,} of "
              f"{metrics.get('total_parameters', 0):,} |", ""]
    evaluations = _evaluations(metrics)
    if evaluations:
        keys = [k for k in dict.fromkeys(k for _, r in evaluations for k in r) if k not in ("step",)]
        lines += ["## Evaluations", "", "| when | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
        lines += [f"| {name} | " + " | ".join(_number(r.get(k)) for k in keys) + " |" for name, r in evaluations]
        counts = sorted({r["examples"] for _, r in evaluations if r.get("examples") is not None})
        if len(counts) > 1:  # a run resumed with another --eval-examples: its rows are not comparable
            lines += ["", f"Evaluations over different held-out sets ({', '.join(map(str, counts))} examples: the run "
                          "was resumed with another --eval-examples): compare only rows with the same count."]
        lines.append("")
    losses = metrics.get("train_losses") or []
    lines += ["## Training", "",
              f"- {len(losses)} steps, loss {_number(losses[0] if losses else None)} → "
              f"{_number(losses[-1] if losses else None)}",
              f"- {_number(metrics.get('tokens_per_second'))} tokens/s (leaving out each run's first step: kernel "
              f"compilation and autotuning); {_number(metrics.get('train_seconds'))} s of training steps in all",
              f"- peak memory {_number(metrics.get('peak_memory_gib'))} GiB ({metrics.get('peak_memory_kind')})"]
    if metrics.get("resumed_from"):
        lines.append(f"- resumed from {metrics['resumed_from']}")
    return "\n".join(lines) + "\n"


def plot_losses(metrics: dict) -> bytes:
    """losses.png's bytes: the training loss per step and each evaluation's loss at its step (matplotlib's
    Figure, no pyplot: nothing global changes in the training process)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    losses = metrics.get("train_losses") or []
    ax.plot(range(1, len(losses) + 1), losses, label="training loss (step)")
    points = [(0, metrics.get("eval_before"))] + [(e["step"], e) for e in metrics.get("evals") or []]
    points.append((len(losses), metrics.get("eval_after")))
    points = [(step, r["loss"]) for step, r in points if r and r.get("loss") is not None]
    if points:
        ax.plot(*zip(*points), "o--", label="evaluation loss")
    config = metrics.get("config", {})
    ax.set_title(f"{config.get('method', '')} {config.get('objective', '')} on {config.get('model', '')}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (mean over target tokens; dpo: over pairs)")
    ax.legend()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return buffer.getvalue()


def write_report(output_dir: str | Path, metrics: dict) -> list[Path]:
    """report.md, and losses.png when matplotlib is installed (it is not a dependency of fastft)."""
    output_dir = Path(output_dir)
    written = [atomic_write(output_dir / "report.md", report_markdown(metrics))]
    if importlib.util.find_spec("matplotlib") is not None:
        written.append(atomic_write(output_dir / "losses.png", plot_losses(metrics)))
    return written


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m fastft.apps.training.report",
                                     description="Draw report.md and losses.png again from a fastft train run's "
                                                 "metrics.json.")
    parser.add_argument("output_dir", metavar="OUTPUT_DIR", help="a fastft train run's folder (its --output-dir)")
    args = parser.parse_args(argv)
    folder = Path(args.output_dir)
    metrics = folder / "metrics.json"
    if not metrics.is_file():
        why = ("no metrics.json in it (not a finished fastft train run)" if folder.is_dir()
               else "not a folder; give the run's folder" if folder.exists() else "no such folder")
        parser.error(f"{folder}: {why}")  # one line, exit status 2
    try:
        values = json.loads(metrics.read_text(encoding="utf-8"))
    except ValueError as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        parser.error(f"{metrics}: not valid JSON ({e})")
    written = write_report(folder, values)
    print("wrote " + " and ".join(map(str, written)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
