"""Training data at its edges: long chats keep their answer, extra keys never change what a record is, every
record is checked against the tokenizer, dpo records carry a preference, files must be UTF-8, and a tokenizer
without an end-of-sequence token is refused before training."""
import copy
import json
import re

import pytest

from fastft.apps.training.config import ConfigError, TrainConfig
from fastft.apps.training.data import (DataError, Encoder, Example, Pair, builtin_instructions, builtin_preferences,
                                       check_tokenizer, load_records, read_jsonl)

IGNORE = -100
CHAT = [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris."}]


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from fastft.apps.models import smollm2_checkpoint
    return AutoTokenizer.from_pretrained(smollm2_checkpoint())


def _changed(tokenizer, **attributes):
    tokenizer = copy.deepcopy(tokenizer)
    for name, value in attributes.items():
        setattr(tokenizer, name, value)
    return tokenizer


def _jsonl(path, *records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


# ------------------------------------------------------------------------------------------- long chats

def test_long_chat_keeps_the_tail_that_ends_at_its_last_trained_token(tokenizer):
    messages = [{"role": "user", "content": "Summarise this. " + "word " * 200},
                {"role": "assistant", "content": "A short answer."}]
    full = Encoder(tokenizer, 10**6).encode({"messages": messages})
    assert full.labels[-1] != IGNORE  # the chat ends with its answer's end-of-turn, which is trained
    cut = Encoder(tokenizer, 32).encode({"messages": messages})
    assert cut.input_ids == full.input_ids[-32:] and cut.labels == full.labels[-32:]
    trained = [i for i, label in zip(cut.input_ids, cut.labels) if label != IGNORE]
    assert tokenizer.decode(trained) == "A short answer.<|im_end|>\n"


def test_chat_whose_answer_fits_is_cut_from_the_right_as_before(tokenizer):
    messages = CHAT + [{"role": "user", "content": "Thanks! " + "word " * 100}]  # a trailing, untrained turn
    full = Encoder(tokenizer, 10**6).encode({"messages": messages})
    length = max(i for i, label in enumerate(full.labels) if label != IGNORE) + 4  # the answer and a bit more
    assert length < len(full.input_ids)
    cut = Encoder(tokenizer, length).encode({"messages": messages})
    assert cut.input_ids == full.input_ids[:length] and cut.labels == full.labels[:length]


def test_builtin_instructions_keep_a_trained_token_at_the_default_length(tokenizer):
    encoder = Encoder(tokenizer, TrainConfig().max_length)
    for record in builtin_instructions(0)[0][:300]:
        # the collator never trains a document's first token
        assert any(label != IGNORE for label in encoder.encode(record).labels[1:]), record


# ------------------------------------------------------------------------------------------- extra keys

@pytest.mark.parametrize("objective", ["sft", "distill"])
def test_extra_keys_do_not_change_what_a_record_is(tokenizer, objective):
    encoder = Encoder(tokenizer, 64, objective)
    text = encoder.encode({"text": "plain text"})
    assert encoder.encode({"text": "plain text", "task": "summarization"}) == text
    assert encoder.encode({"text": "plain text", "chosen": True}) == text
    assert encoder.encode({"messages": CHAT, "task": "mr"}) == encoder.encode({"messages": CHAT})
    assert encoder.encode({"text": "plain text", "label": 1, "task": "mr"}) == text


def test_the_objective_decides_what_is_a_pair(tokenizer):
    record = {"prompt": "Colour?", "chosen": " blue", "rejected": " red", "text": "a note"}
    assert isinstance(Encoder(tokenizer, 64, "dpo").encode(record), Pair)
    assert Encoder(tokenizer, 64, "sft").encode(record) == Encoder(tokenizer, 64).encode({"text": "a note"})


def test_builtin_classification_records_stay_classification_and_user_records_cannot_pose_as_them(tokenizer,
                                                                                                tmp_path):
    train, evaluation, _ = load_records(TrainConfig(task="mr", eval_examples=4))
    example = Encoder(tokenizer, 64, "sft").encode(train[0])
    assert example.choices is not None and sum(label != IGNORE for label in example.labels) == 1
    assert all("task" not in r for r in train + evaluation)  # the marker is private, not a user-facing key
    marker = next(k for k in train[0] if k not in ("text", "label"))
    data = _jsonl(tmp_path / "d.jsonl", {"text": "plain text", marker: "mr", "label": 0})
    (record,) = read_jsonl(data, "sft")
    assert Encoder(tokenizer, 64, "sft").encode(record) == Encoder(tokenizer, 64).encode({"text": "plain text"})


# ------------------------------------------------------------------------------------------- check_tokenizer

def test_check_tokenizer_looks_past_the_first_record(tokenizer):
    no_template = _changed(tokenizer, chat_template=None)
    records = [{"text": "a plain text record first"}] + [{"messages": CHAT}] * 3
    with pytest.raises(ConfigError, match="no chat template"):
        check_tokenizer(no_template, records)
    check_tokenizer(no_template, records[:1])
    check_tokenizer(tokenizer, records)


# ------------------------------------------------------------------------------------------- dpo records

GOOD_PAIR = {"prompt": "Colour of the sky?", "chosen": " blue", "rejected": " green"}


@pytest.mark.parametrize("change, problem", [
    ({"prompt": ""}, "'prompt' is empty"),
    ({"prompt": " \n\t"}, "'prompt' is empty"),
    ({"chosen": ""}, "'chosen' is empty"),
    ({"rejected": ""}, "'rejected' is empty"),
    ({"rejected": " blue"}, "'chosen' and 'rejected' are the same text"),
])
def test_dpo_records_without_a_preference_are_refused(tmp_path, change, problem):
    data = _jsonl(tmp_path / "pairs.jsonl", GOOD_PAIR, {**GOOD_PAIR, **change})
    with pytest.raises(DataError, match=re.escape(f"{data}:2: {problem}")):
        read_jsonl(data, "dpo")


def test_builtin_preferences_are_valid_dpo_records(tmp_path):
    from fastft.apps.datasets import TASK_NAMES

    for name in TASK_NAMES:
        train, evaluation = builtin_preferences(name, 0)
        data = _jsonl(tmp_path / f"{name}.jsonl", *train, *evaluation)
        assert len(read_jsonl(data, "dpo")) == len(train) + len(evaluation)


# ------------------------------------------------------------------------------------------- files

def test_a_file_that_is_not_utf8_names_its_line(tmp_path):
    data = tmp_path / "latin1.jsonl"
    data.write_bytes(b'{"text": "fine"}\n\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=re.escape(f"{data}:3: not UTF-8") + ".* must be UTF-8"):
        read_jsonl(data, "sft")
    data.write_bytes(b'\xef\xbb\xbf{"text": "caf\xc3\xa9"}\n')  # a byte-order mark (Windows editors write one)
    assert read_jsonl(data, "sft") == [{"text": "caf\u00e9"}]


# ------------------------------------------------------------------------------------------- end of sequence

def test_a_tokenizer_without_eos_is_refused_for_text_and_pairs(tokenizer):
    no_eos = _changed(tokenizer, eos_token=None)
    assert no_eos.eos_token_id is None
    for records, objective in (([{"messages": CHAT}, {"text": "plain"}], "sft"), ([GOOD_PAIR], "dpo")):
        with pytest.raises(ConfigError, match="no end-of-sequence token.*eos_token"):
            check_tokenizer(no_eos, records, objective)
        with pytest.raises(ConfigError, match="no end-of-sequence token"):
            Encoder(no_eos, 64, objective).encode(records[-1])
    check_tokenizer(no_eos, [{"messages": CHAT}], "sft")  # a chat ends with its template's end of turn
    assert isinstance(Encoder(no_eos, 64, "sft").encode({"messages": CHAT}), Example)
