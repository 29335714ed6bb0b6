"""Run logs: JSON lines (OUTPUT_DIR/logs.jsonl, one object per step or evaluation), TensorBoard when it is
installed, and the progress bar's figures (loss, tokens/s, memory)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from fastft.apps.host_memory import peak_rss_bytes
from fastft.files import atomic_write


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return peak_rss_bytes() / 2**30


class RunLog:
    """Appends to logs.jsonl (main process only). On resume, lines past the checkpoint's step are dropped:
    the killed run wrote them, the resumed run writes them again; so is every evaluation the checkpoint does not hold
    (`eval_steps`: the steps of its periodic ones): a finished run's final evaluation, written after its last
    checkpoint, which the resumed run writes again (as its own final one, or as the periodic one of a run extended
    with a larger --steps)."""

    def __init__(self, output_dir: str, enabled: bool, resume_step: int | None = None, eval_steps=()):
        self.path = Path(output_dir) / "logs.jsonl"
        self.enabled = enabled
        self.tensorboard = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_text("")
        elif self.path.exists():
            def keep(record) -> bool:
                return record is not None and record["step"] <= resume_step \
                    and ("eval" not in record or record["step"] in eval_steps)
            kept = [line for line in _lines(self.path) if keep(_record(line))]
            atomic_write(self.path, "".join(kept))
        try:
            from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package
        except ImportError:
            return
        # events past the checkpoint's step (a fresh start: every one), which an earlier run in this folder wrote
        # and this run writes again, are purged (TensorBoard showed each of those steps twice)
        self.tensorboard = SummaryWriter(str(Path(output_dir) / "tensorboard"),
                                         purge_step=0 if resume_step is None else resume_step + 1)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:  # strict JSON: a non-finite number (an fp16 step the scaler skipped: its
            f.write(json.dumps(_finite(record), allow_nan=False) + "\n")  # gradient norm is inf) is null
        if self.tensorboard is not None:
            prefix = "eval/" if "eval" in record else "train/"
            values = record.get("eval", record)
            for key, value in values.items():
                if isinstance(value, (int, float)) and key != "step":
                    self.tensorboard.add_scalar(prefix + key, value, record["step"])

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()


def _finite(value):
    """`value` with every non-finite float (inf, nan), nested in dicts and lists too, replaced by None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _lines(path: Path) -> list[str]:
    """The file's lines, each with its newline; a line that is not UTF-8 (garbage a crash left: appends are not
    fsynced) is dropped, as a torn one is."""
    lines = []
    for raw in path.read_bytes().splitlines(keepends=True):
        try:
            lines.append(raw.decode("utf-8"))
        except UnicodeDecodeError:
            continue
    return lines


def _record(line: str) -> dict | None:
    """A logs.jsonl line's object, None for a torn or foreign line."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) and isinstance(record.get("step"), int) else None
