"""`fastft study` from an audit of its numbers: --max-dev / --max-test took a split's first N rows, which could leave
out a rare class (SMS spam's first 16 dev rows hold no spam, and dev macro-F1 then chose a checkpoint that always
says "no"): the caps now keep each class its share. SmolLM2's prompts were cut from the left past --max-length, so
a BBC article lost its headline and the "Article:" cue (MiniLM keeps them): now the text's end is cut."""
from collections import Counter
from dataclasses import replace

import pytest
import torch

from fastft.apps.study import cell as cell_module
from fastft.apps.study.cell import CellSpec, run_cell
from fastft.apps.study import tasks as study_tasks
from fastft.apps.study.tasks import StudyTask, capped_rows, load_study_task
from tests.test_study_review_fixes import SETTINGS, use_stand_in


def _counts(rows):
    return dict(sorted(Counter(y for _, y in rows).items()))


def test_a_cap_keeps_each_class_its_share_in_the_splits_order():
    rows = [(f"r{i}", 0) for i in range(14)] + [(f"s{i}", 1) for i in range(4)] + [("t0", 2)]
    rows = rows[::2] + rows[1::2]  # classes interleaved unevenly: the first 6 rows are all class 0
    kept = capped_rows(rows, 6)
    assert _counts(kept) == {0: 3, 1: 2, 2: 1}  # one row each, then 3 by share: 13:3:0 → 2.44, 0.56, 0 → 2, 1, 0
    assert kept == [r for r in rows if r in kept]  # the split's order, and each class's first rows
    assert [r for r in kept if r[1] == 0] == [r for r in rows if r[1] == 0][:3]
    assert _counts(capped_rows(rows, 2)) == {0: 2}  # fewer rows than classes: by share alone
    assert capped_rows(rows, None) == capped_rows(rows, 19) == capped_rows(rows, 50) == rows
    assert len(capped_rows(rows, 11)) == 11


def test_capped_dev_and_test_rows_of_sms_spam_hold_spam():
    task = load_study_task("sms-spam")
    assert _counts(task.dev[:16]) == {0: 16}  # why: the split's first rows alone
    assert _counts(capped_rows(task.dev, 16)) == {0: 13, 1: 3}
    assert _counts(study_tasks.tested_rows(task, 32)) == {0: 27, 1: 5}  # the quick study's test cap is 128


def test_a_cell_evaluates_the_capped_dev_rows(monkeypatch):
    use_stand_in(monkeypatch)
    dev = [("0", 0)] * 6 + [("1", 1)] * 2
    task = StudyTask("toy", "toy", "{text}", (" a", " b"), train=dev * 2, dev=dev, test=dev)
    monkeypatch.setattr(cell_module, "load_study_task", lambda name: task)
    seen = []
    real = cell_module.evaluate

    def recording(prepared, model, rows, *args):
        seen.append(rows)
        return real(prepared, model, rows, *args)

    monkeypatch.setattr(cell_module, "evaluate", recording)
    result = run_cell(CellSpec("minilm", "toy", "32-per-class", "lora", "fastft", 0), replace(SETTINGS, max_dev=4))
    assert result["status"] == "done" and result["dev_examples"] == 4
    dev_calls = seen[:-1]  # the last call is the test's
    assert dev_calls and all(_counts(rows) == {0: 3, 1: 1} for rows in dev_calls)


@pytest.mark.slow
def test_smollm2_keeps_a_long_articles_headline_and_the_prompts_tail():
    from fastft.apps.study.models import _base, prepare_model

    task = load_study_task("bbc-news")
    tokenizer = _base("smollm2")[1]
    prepared = prepare_model("smollm2", task, 128, 0)
    long_text, short_text = task.test[0][0], "Short news."
    batch = prepared.collate([(long_text, 0), (short_text, 1)])
    long_ids, short_ids = batch["input_ids"].tolist()
    head = tokenizer("Article: " + long_text, add_special_tokens=False)["input_ids"]
    tail = tokenizer(long_text + "\nTopic:", add_special_tokens=False)["input_ids"]
    assert len(head) > 300 and batch["attention_mask"][0].sum() == len(long_ids) == 128
    assert long_ids[:100] == head[:100]  # the cue and the text's start (its headline)
    assert tokenizer.decode(long_ids[-3:]).endswith("\nTopic:") and long_ids[-3:] == tail[-3:]
    n = int(batch["attention_mask"][1].sum())  # a prompt that fits is the template's tokens, untouched
    assert short_ids[:n] == tokenizer(task.template.format(text=short_text), add_special_tokens=False)["input_ids"]
    # a --max-length under the template's own length keeps the tokens before the label word
    tiny = prepare_model("smollm2", task, 3, 0).collate([(long_text, 0)])["input_ids"][0].tolist()
    assert tiny == tail[-3:]
    assert torch.is_tensor(batch["labels"])
