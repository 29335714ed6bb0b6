"""Training data at its edges: long chats keep their answer, extra keys never change what a record is, every
record is checked against the tokenizer, dpo records carry a preference, files must be UTF-8, and a tokenizer
without an end-of-sequence token is refused before training."""
import copy
import json
import re

import pytest

from fastft.apps.training.config import ConfigError, TrainConfig
from fastft.apps.training.data import Encoder, Example, Pair, check_tokenizer
from fastft.apps.training.records import DataError, builtin_instructions, builtin_preferences, load_records, read_jsonl

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
    from fastft.apps.training.config import resolved_max_length

    encoder = Encoder(tokenizer, resolved_max_length(TrainConfig(task="instructions")))
    cut = 0
    for record in builtin_instructions(0)[0][:300]:
        # the collator never trains a document's first token
        assert any(label != IGNORE for label in encoder.encode(record).labels[1:]), record
        cut += encoder.last_cut
    # at the old default (64) about half were cut, 1 in 15 down to an answer without its question
    assert cut <= 3, cut


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


# ------------------------------------------------------------------------------------------- other common forms

def test_sharegpt_and_alpaca_records_are_read_as_their_chats(tmp_path, tokenizer):
    """The two forms most instruction sets ship in (Unsloth's and Axolotl's examples): read as the chat they hold."""
    sharegpt = {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Capital?"},
                                  {"from": "gpt", "value": "Paris."}]}
    alpaca = {"instruction": "Add the numbers.", "input": "2 and 2", "output": "4"}
    bare = {"instruction": "Say hi.", "input": "", "output": "Hi!", "system": "Be kind."}
    records = read_jsonl(_jsonl(tmp_path / "mixed.jsonl", sharegpt, alpaca, bare), "sft")
    assert [r["messages"] for r in records] == [
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital?"},
         {"role": "assistant", "content": "Paris."}],
        [{"role": "user", "content": "Add the numbers.\n\n2 and 2"}, {"role": "assistant", "content": "4"}],
        [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Say hi."},
         {"role": "assistant", "content": "Hi!"}]]
    encoder = Encoder(tokenizer, 128)
    assert encoder.encode(records[0]) == encoder.encode({"messages": records[0]["messages"]})
    check_tokenizer(tokenizer, records)
    # a record with a canonical field keeps it, as "text" wins over "messages"
    (both,) = read_jsonl(_jsonl(tmp_path / "both.jsonl", {"text": "plain", "messages": CHAT}), "sft")
    assert Encoder(tokenizer, 64).kind(both) == "text"


def test_a_rendered_text_beside_sharegpt_turns_is_not_trained(tmp_path):
    """As an Alpaca record's: a ShareGPT record with "text" (its rendered chat) was trained as text, every human
    turn with loss; its turns decide now, the assistant's alone trained."""
    sharegpt = {"text": "Human: Capital?\nAssistant: Paris.", "conversations": [{"from": "human", "value": "Capital?"},
                                                                              {"from": "gpt", "value": "Paris."}]}
    (record,) = read_jsonl(_jsonl(tmp_path / "sg.jsonl", sharegpt), "sft")
    assert "text" not in record and record["messages"] == [{"role": "user", "content": "Capital?"},
                                                           {"role": "assistant", "content": "Paris."}]


def test_prompt_completion_records_train_the_completion_only(tmp_path, tokenizer):
    """TRL's prompt-completion form: the prompt untrained, the completion and end of sequence trained, each
    tokenized alone; too long, the window that ends with the completion, BOS kept for a tokenizer that adds one."""
    from transformers import AutoTokenizer

    from fastft.apps.models import smollm2_checkpoint

    (record,) = read_jsonl(_jsonl(tmp_path / "pc.jsonl", {"prompt": "The sky is", "completion": " blue."}), "sft")
    example = Encoder(tokenizer, 64).encode(record)
    prompt, answer = (tokenizer(t, add_special_tokens=False)["input_ids"] for t in ("The sky is", " blue."))
    eos = tokenizer.eos_token_id
    assert example == Example(prompt + answer + [eos], [IGNORE] * len(prompt) + answer + [eos])
    adds_bos = AutoTokenizer.from_pretrained(smollm2_checkpoint(), add_bos_token=True)
    long = {"prompt": "word " * 40, "completion": " blue."}
    cut = Encoder(adds_bos, 8).encode(long)
    assert len(cut.input_ids) == 8 and cut.input_ids[0] == adds_bos.bos_token_id
    assert cut.input_ids[-len(answer) - 1:] == answer + [eos] and cut.labels[-len(answer) - 1:] == answer + [eos]
    assert set(cut.labels[: 8 - len(answer) - 1]) == {IGNORE}


def test_prompt_completion_and_conversational_pairs_add_no_sentencepiece_space():
    """Tokenized alone, a completion (and a conversational dpo answer) got the "▁" a SentencePiece tokenizer puts
    before every string: "France?  Paris." trained with a space generation never produces. They are tokenized with
    their prompt now, as a chat is: the completion's document is the whole text's tokens, the dpo answer's
    document the chat's."""
    tok = _llama2_style_tokenizer()
    example = Encoder(tok, 64).encode({"prompt": "Capital of France?", "completion": " Paris."})
    whole = tok("Capital of France? Paris.", add_special_tokens=False)["input_ids"]
    assert example.input_ids == whole + [tok.eos_token_id]
    tok.chat_template = LLAMA2_TEMPLATE
    pair = Encoder(tok, 128, "dpo").encode({"prompt": CHAT[:1], "chosen": CHAT[1:],
                                            "rejected": [{"role": "assistant", "content": "Lyon."}]})
    assert pair.chosen == Encoder(tok, 128).encode({"messages": CHAT})


def test_a_conversational_pair_shares_one_prompt_when_a_token_crosses_an_answer_start():
    """With a SentencePiece tokenizer, "ASSISTANT:" + " Paris." merges ":▁" (kept whole, with the answer) where
    "ASSISTANT:" + "Rome." does not: chosen's prompt ended "T", rejected's ":" and only chosen's reward scored the
    prompt's ":". Both documents now share the prompt up to the first trained token of either."""
    tok = _llama2_style_tokenizer()
    tok.chat_template = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}"
                         "{{ 'USER: ' + m['content'] + '\n' }}{% else %}{{ 'ASSISTANT:' + m['content'] + eos_token }}"
                         "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")
    pair = Encoder(tok, 256, "dpo").encode({"prompt": CHAT[:1], "chosen": [{"role": "assistant", "content": " Paris."}],
                                            "rejected": [{"role": "assistant", "content": "Rome."}]})
    prompts = [d.input_ids[: d.labels.index(next(x for x in d.labels if x != IGNORE))] for d in (pair.chosen,
                                                                                                pair.rejected)]
    assert prompts[0] == prompts[1]
    for doc, text in ((pair.chosen, "ASSISTANT: Paris.</s>"), (pair.rejected, "ASSISTANT:Rome.</s>")):
        assert tok.decode(doc.input_ids).replace(" ", "").endswith(text.replace(" ", ""))


def test_other_forms_keep_what_they_hold(tmp_path, tokenizer):
    """ShareGPT's top-level system prompt (LLaMA-Factory), Alpaca's earlier turns ("history") and an Alpaca record
    that also ships its rendered prompt as "text" (tatsu-lab/alpaca): read as the chat they hold, nothing dropped,
    the rendered prompt not trained as text."""
    sharegpt = {"system": "Be brief.", "conversations": [{"from": "human", "value": "Hi?"},
                                                        {"from": "gpt", "value": "Hello."}]}
    alpaca = {"instruction": "And 3+3?", "output": "6", "history": [["2+2?", "4"]],
              "text": "Below is an instruction...\n### Response:\n6"}
    same = {**sharegpt, "conversations": [{"from": "system", "value": "Be brief."}, *sharegpt["conversations"]]}
    records = read_jsonl(_jsonl(tmp_path / "forms.jsonl", sharegpt, alpaca, same), "sft")
    assert records[0]["messages"][0] == {"role": "system", "content": "Be brief."}
    assert records[2]["messages"] == records[0]["messages"]  # the same system prompt twice: kept once
    assert [m["content"] for m in records[1]["messages"]] == ["2+2?", "4", "And 3+3?", "6"]
    assert Encoder(tokenizer, 64).kind(records[1]) == "chat" and "text" not in records[1]


@pytest.mark.parametrize("record, problem", [
    ({"conversations": [{"from": "bot", "value": "hi"}]}, 'conversations[0] must be {"from": one of human/'),
    ({"prompt": " ", "completion": "A"}, "'prompt' is empty; a record without a prompt is a {\"text\": ...}"),
    ({"instruction": "Q", "output": "A", "history": [["x"]]},
     "an Alpaca record's 'history' must be a list of [instruction, output]"),
    ({"conversations": []}, "'conversations' must be a non-empty list"),
    ({"instruction": "Do.", "output": 4}, "an Alpaca record needs string fields instruction"),
    ({"prompt": "Q", "completion": [{"role": "assistant", "content": "A"}]},
     "a prompt-completion record needs string fields prompt and"),
    ({"prompt": "Q", "completion": ""}, "'completion' is empty"),
    ({"question": "Q", "answer": "A"}, "expected a 'text', 'messages' or 'prompt'/'completion' field"),
    # an empty answer trained only the end-of-turn (stop at once); a mistyped optional field was dropped silently
    ({"instruction": "Q", "output": ""}, "an Alpaca record's 'output' is empty"),
    ({"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": ""}]},
     "every gpt (assistant) turn of 'conversations' is empty"),
    ({"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": ""}]}, "every assistant turn"),
    ({"instruction": "Q", "input": 0, "output": "A"}, "an Alpaca record's 'input' must be text, got int"),
    ({"instruction": "Q", "output": "A", "system": []}, "an Alpaca record's 'system' must be text, got list"),
    ({"system": {"x": 1}, "conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]},
     "'system' must be text, got dict"),
    # whitespace alone was accepted where an empty field is refused
    ({"text": " \n\t"}, "'text' must be a non-empty string"),
    ({"messages": [CHAT[0], {"role": "assistant", "content": "  "}]}, "every assistant turn is empty"),
    ({"prompt": "Q", "completion": " \n"}, "'completion' is empty"),
    ({"instruction": "  ", "output": "A"}, "an Alpaca record needs string fields instruction (non-empty)"),
    # the top-level system prompt was dropped silently beside a system turn
    ({"system": "Be brief.", "conversations": [{"from": "human", "value": "Q"}, {"from": "system", "value": "Be kind."},
                                               {"from": "gpt", "value": "A"}]},
     "'system' differs from the system turn conversations[1]: a chat has one system prompt; keep one of them"),
    # half an Alpaca record got the generic "expected a 'text', 'messages' or ..."
    ({"instruction": "Q", "input": "x"}, "an Alpaca record needs 'output' (the answer to train on)"),
    ({"input": "x", "output": "A"}, "an Alpaca record needs 'instruction'"),
])
def test_malformed_records_of_the_other_forms_are_refused(tmp_path, record, problem):
    data = _jsonl(tmp_path / "bad.jsonl", {"text": "fine"}, record)
    with pytest.raises(DataError, match=re.escape(f"{data}:2: {problem}")):
        read_jsonl(data, "sft")


# ------------------------------------------------------------------------------------------- dpo records

GOOD_PAIR = {"prompt": "Colour of the sky?", "chosen": " blue", "rejected": " green"}


@pytest.mark.parametrize("change, problem", [
    ({"prompt": ""}, "'prompt' is empty"),
    ({"prompt": " \n\t"}, "'prompt' is empty"),
    ({"chosen": ""}, "'chosen' is empty"),
    ({"rejected": ""}, "'rejected' is empty"),
    ({"chosen": "  "}, "'chosen' is empty"),
    ({"rejected": "\n"}, "'rejected' is empty"),
    ({"rejected": " blue"}, "'chosen' and 'rejected' are the same text"),
])
def test_dpo_records_without_a_preference_are_refused(tmp_path, change, problem):
    data = _jsonl(tmp_path / "pairs.jsonl", GOOD_PAIR, {**GOOD_PAIR, **change})
    with pytest.raises(DataError, match=re.escape(f"{data}:2: {problem}")):
        read_jsonl(data, "dpo")


@pytest.mark.parametrize("objective, record, problem", [
    # a preference file under sft/distill (no --objective dpo) said only "expected a 'text', 'messages' or ..."
    ("sft", GOOD_PAIR, "a preference pair (prompt, chosen, rejected): train it with --objective dpo"),
    ("distill", {"chosen": CHAT, "rejected": CHAT[:1]}, "a preference pair (prompt, chosen, rejected): train it"),
    # a chat file under --objective dpo said "a dpo record needs string fields ... ('prompt' is missing ...)"
    ("dpo", {"messages": CHAT}, "'messages' is a field of sft's records, not of a preference pair: --objective dpo "
                                "needs prompt, chosen and rejected fields; train this file with --objective sft"),
    ("dpo", {"prompt": "Q", "completion": "A"}, "'completion' is a field of sft's records"),
    ("dpo", {"instruction": "Q", "output": "A"}, "'instruction' is a field of sft's records"),
])
def test_a_record_of_the_other_objective_names_the_objective_to_use(tmp_path, objective, record, problem):
    """The likeliest cause of a whole file of the other objective's records is the --objective flag: say so."""
    data = _jsonl(tmp_path / "data.jsonl", record)
    with pytest.raises(DataError, match=re.escape(f"{data}:1: {problem}")):
        read_jsonl(data, objective)


USER = {"role": "user", "content": "Capital of France?"}
PARIS, LYON = ({"role": "assistant", "content": c} for c in ("Paris.", "Lyon."))


def test_conversational_dpo_records_are_rendered_by_the_chat_template(tmp_path, tokenizer):
    """TRL's conversational preference forms: explicit (prompt, chosen, rejected lists of messages) and implicit
    (whole conversations sharing their opening turns). Each answer is trained as a chat's answer is (its
    end-of-turn included), after the prompt rendered with the generation prompt."""
    explicit = {"prompt": [USER], "chosen": [PARIS], "rejected": [LYON]}
    implicit = {"chosen": [USER, PARIS], "rejected": [USER, LYON]}
    history = [USER, PARIS, {"role": "user", "content": "And of Italy?"}]
    longer = {"chosen": history + [{"role": "assistant", "content": "Rome."}],
              "rejected": history + [{"role": "assistant", "content": "Milan."}]}
    records = read_jsonl(_jsonl(tmp_path / "pairs.jsonl", explicit, implicit, longer), "dpo")
    assert records[1]["prompt"] == [USER] and records[2]["prompt"] == history
    check_tokenizer(tokenizer, records, "dpo")
    encoder = Encoder(tokenizer, 256, "dpo")
    pair = encoder.encode(records[0])
    assert pair == encoder.encode(records[1])
    chat = Encoder(tokenizer, 256).encode({"messages": [USER, PARIS]})
    assert pair.chosen == chat  # the chosen answer's document is the chat's, trained alike
    trained = [tokenizer.decode([i for i, label in zip(d.input_ids, d.labels) if label != IGNORE])
               for d in (pair.rejected, encoder.encode(records[2]).chosen)]
    assert trained == ["Lyon.<|im_end|>\n", "Rome.<|im_end|>\n"]
    with pytest.raises(ConfigError, match="no chat template"):
        check_tokenizer(_changed(tokenizer, chat_template=None), records, "dpo")


@pytest.mark.parametrize("record, problem", [
    ({"prompt": [USER], "chosen": [USER, PARIS], "rejected": [LYON]}, "'chosen' must start with the assistant's"),
    ({"prompt": [USER], "chosen": [PARIS], "rejected": [PARIS]}, "'chosen' and 'rejected' are the same messages"),
    ({"prompt": [USER], "chosen": [{"role": "bot", "content": "x"}], "rejected": [LYON]}, 'chosen[0] must be {"role"'),
    ({"chosen": [USER, PARIS], "rejected": [USER, PARIS]}, "'chosen' and 'rejected' are the same messages"),
    ({"chosen": [USER, PARIS], "rejected": [USER]}, "'rejected' must be a non-empty list of messages"),
    # a shared answer, then different user turns: the user turns would be scored as the answers' text
    ({"chosen": [USER, PARIS, {"role": "user", "content": "Sure?"}, PARIS],
      "rejected": [USER, PARIS, {"role": "user", "content": "Really?"}, LYON]}, "'chosen' holds a user turn after"),
])
def test_malformed_conversational_dpo_records_are_refused(tmp_path, record, problem):
    data = _jsonl(tmp_path / "pairs.jsonl", GOOD_PAIR, record)
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


@pytest.mark.parametrize("content, problem", [
    (b'[\n  {"text": "a"},\n  {"text": "b"}\n]\n', ":1: a JSON array (one document), not JSON Lines"),
    (b'[{"text": "a"}, {"text": "b"}]\n', ":1: a JSON array (one document), not JSON Lines"),
    (b"\x1f\x8b\x08\x00rest", ": gzip-compressed; decompress it first"),
    ("{\"text\": \"a\"}\n".encode("utf-16"), ": UTF-16 text; convert it to UTF-8"),
    (b"PAR1\x00\x00", ": a Parquet file; write it as JSON Lines"),
    (b'{"text": "fine"}\n{"text": "half \\ud83d emoji"}\n', ":2: holds a lone UTF-16 surrogate escape"),
])
def test_files_that_are_not_json_lines_say_what_they_are(tmp_path, content, problem):
    """A JSON array (Alpaca's alpaca_data.json) was "not valid JSON (Expecting value at column 1)"; gzip and
    UTF-16 were told to convert from latin1; a lone surrogate crashed in the tokenizer naming no line."""
    data = tmp_path / "data.jsonl"
    data.write_bytes(content)
    with pytest.raises(DataError, match=re.escape(f"{data}{problem}")):
        read_jsonl(data, "sft")
    data.write_bytes(b'{"text": "a whole emoji \\ud83d\\ude00"}\n')  # a surrogate pair is one character
    assert read_jsonl(data, "sft") == [{"text": "a whole emoji \U0001f600"}]


def test_chats_without_a_chat_template_name_the_record(tokenizer, tmp_path):
    records = read_jsonl(_jsonl(tmp_path / "a.jsonl", {"text": "x"}, {"instruction": "Q", "output": "A"}), "sft")
    with pytest.raises(ConfigError, match=re.escape(f"{tmp_path / 'a.jsonl'}:2: a chat record") +
                       ".*Alpaca lines are read as chats.*no chat template"):
        check_tokenizer(_changed(tokenizer, chat_template=None), records)


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


# ------------------------------------------------------------------------------------------- chats opening with the assistant

def _trained_text(tokenizer, example):
    return tokenizer.decode([i for i, label in zip(example.input_ids, example.labels) if label != IGNORE])


def test_a_chat_opening_with_the_assistant_trains_only_its_answers(tokenizer):
    opening = [{"role": "assistant", "content": "Hello! How can I help?"}] + CHAT
    example = Encoder(tokenizer, 512).encode({"messages": opening})
    # SmolLM2's template inserts a default system prompt and the role header before the first answer: untrained
    assert _trained_text(tokenizer, example) == "Hello! How can I help?<|im_end|>\nParis.<|im_end|>\n"
    with_system = Encoder(tokenizer, 512).encode({"messages": [{"role": "system", "content": "Be brief."}] + opening})
    assert _trained_text(tokenizer, example) == _trained_text(tokenizer, with_system)
    # the document is still the template's rendering, token for token
    rendered = tokenizer.apply_chat_template(opening, tokenize=False)
    assert tokenizer.decode(example.input_ids) == rendered
    untrained = tokenizer.decode([i for i, label in zip(example.input_ids, example.labels) if label == IGNORE])
    assert untrained.startswith("<|im_start|>system\n") and untrained.endswith("<|im_start|>assistant\n")


@pytest.mark.parametrize("lead", ["", " ", "\n", "  ", "\n\n", "\t", " \n", "\n\n\n", "   "])
def test_an_answer_opening_with_whitespace_is_trained_after_the_generation_prompt(tokenizer, lead):
    """Tokenized whole, the template's "\n" after "assistant" and an answer's leading blank line merged into one
    "\n\n" token, trained after "...assistant": a context generation (whose prompt ends with the "\n") never
    has. Each answer's context is now its generation prompt's tokens, and the document still decodes to the
    rendered chat."""
    messages = [{"role": "user", "content": "Capital?"}, {"role": "assistant", "content": lead + "Paris."},
                {"role": "user", "content": "And Italy?"}, {"role": "assistant", "content": lead + "Rome."}]
    example = Encoder(tokenizer, 512).encode({"messages": messages})
    assert tokenizer.decode(example.input_ids) == tokenizer.apply_chat_template(messages, tokenize=False)
    starts = [i for i, label in enumerate(example.labels) if label != IGNORE and example.labels[i - 1] == IGNORE]
    assert len(starts) == 2
    prompt = tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert example.input_ids[: starts[0]] == tokenizer(prompt, add_special_tokens=False)["input_ids"]
    second = tokenizer.apply_chat_template(messages[:3], tokenize=False, add_generation_prompt=True)
    assert tokenizer.decode(example.input_ids[: starts[1]]) == second  # the text before it, to the character
    assert _trained_text(tokenizer, example) == f"{lead}Paris.<|im_end|>\n{lead}Rome.<|im_end|>\n"


# ------------------------------------------------------------------------------------------- SentencePiece chats

LLAMA2_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}"
                   "{{ '[INST] ' + m['content'] + ' [/INST]' }}{% else %}{{ ' ' + m['content'] + eos_token }}"
                   "{% endif %}{% endfor %}")


def _llama2_style_tokenizer():
    """A SentencePiece-style fast tokenizer as Llama-2's and Mistral's are set up (legacy): the normalizer puts "▁"
    before every string it tokenizes, and spaces become "▁"; trained here on the built-in chats' text."""
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [m["content"] for r in builtin_instructions(0)[0][:1000] for m in r["messages"]]
    tk = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tk.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tk.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tk.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=600, special_tokens=["<unk>", "<s>", "</s>"]))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tok.chat_template = LLAMA2_TEMPLATE
    return tok


# Llama 2-style chat whose answer follows "ASSISTANT:" and a space: a SentencePiece tokenizer merges ":▁" across the
# answer's start
ANSWER_AFTER_COLON_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}"
                               "{{ 'USER: ' + m['content'] + '\n' }}{% else %}{{ 'ASSISTANT:' + ' ' + m['content'] + "
                               "eos_token + '\n' }}{% endif %}{% endfor %}{% if add_generation_prompt %}"
                               "{{ 'ASSISTANT:' }}{% endif %}")


def test_a_sentencepiece_token_across_an_answer_start_stays_whole():
    """Split at an answer's start, each side of a SentencePiece token ("ASSISTANT:" + " Paris" merges ":▁") got
    its own prepended "▁": the document decoded "ASSISTANT :  Paris". A split whose parts do not spell the token
    is not made: the chat keeps the rendered text's tokens."""
    tok = _llama2_style_tokenizer()
    tok.chat_template = ANSWER_AFTER_COLON_TEMPLATE
    example = Encoder(tok, 512).encode({"messages": CHAT})
    rendered = tok.apply_chat_template(CHAT, tokenize=False)
    assert example.input_ids == tok(rendered, add_special_tokens=False)["input_ids"]
    assert tok.decode(example.input_ids) == tok.decode(tok(rendered, add_special_tokens=False)["input_ids"])


def test_a_chat_is_tokenized_as_rendered_whole_by_a_sentencepiece_tokenizer():
    """Tokenized piece by piece, each answer got a "▁" token before it that generation never produces; the chat is
    now the rendered text's tokens, the answers (and their end of sequence) trained."""
    tok = _llama2_style_tokenizer()
    messages = CHAT + [{"role": "user", "content": "And of Italy?"}, {"role": "assistant", "content": "Rome, I think."}]
    example = Encoder(tok, 512).encode({"messages": messages})
    rendered = tok.apply_chat_template(messages, tokenize=False)
    assert example.input_ids == tok(rendered, add_special_tokens=False)["input_ids"]
    prompt = tok(tok.apply_chat_template(messages[:1], tokenize=False), add_special_tokens=False)["input_ids"]
    assert example.input_ids[: len(prompt)] == prompt  # the prompt's tokens as generation sees them
    assert set(example.labels[: len(prompt)]) == {IGNORE} and example.labels[len(prompt)] != IGNORE
    trained = [i for i, label in zip(example.input_ids, example.labels) if label != IGNORE]
    assert tok.decode(trained) == "Paris.</s> Rome, I think.</s>"


# ------------------------------------------------------------------------------------------- special tokens at the edges

def test_end_of_sequence_is_never_doubled(tokenizer):
    from transformers import AutoTokenizer

    from fastft.apps.models import smollm2_checkpoint
    eos, E = tokenizer.eos_token_id, tokenizer.eos_token
    single = Encoder(tokenizer, 64).encode({"text": "Hello there."}).input_ids
    assert single[-1] == eos and single[-2] != eos
    assert Encoder(tokenizer, 64).encode({"text": "Hello there." + E}).input_ids == single
    adds_eos = AutoTokenizer.from_pretrained(smollm2_checkpoint(), add_eos_token=True)
    assert Encoder(adds_eos, 64).encode({"text": "Hello there."}).input_ids == single
    plain = Encoder(tokenizer, 64, "dpo").encode({"prompt": "Q?", "chosen": "yes", "rejected": "no"})
    ending = Encoder(tokenizer, 64, "dpo").encode({"prompt": "Q?", "chosen": "yes" + E, "rejected": "no" + E})
    assert ending == plain and plain.chosen.input_ids[-2:] != [eos, eos]


def test_every_kind_of_document_starts_with_the_tokenizers_bos(tokenizer):
    from transformers import AutoTokenizer

    from fastft.apps.models import smollm2_checkpoint
    from fastft.apps.training.records import BUILTIN_TASK
    adds_bos = AutoTokenizer.from_pretrained(smollm2_checkpoint(), add_bos_token=True)
    bos = adds_bos.bos_token_id
    assert adds_bos("x")["input_ids"][0] == bos
    text = Encoder(adds_bos, 64).encode({"text": "Colour of the sky?"}).input_ids
    pair = Encoder(adds_bos, 64, "dpo").encode({"prompt": "Colour of the sky?", "chosen": " blue", "rejected": " red"})
    classification = Encoder(adds_bos, 64).encode({BUILTIN_TASK: "mr", "text": "Great film.", "label": 1})
    for ids in (text, pair.chosen.input_ids, pair.rejected.input_ids, classification.input_ids):
        assert ids[0] == bos and ids[1] != bos
    assert pair.chosen.input_ids[: len(text) - 1] == text[:-1]  # the prompt as the text record tokenizes it
    # a prompt cut from its left keeps its BOS; a text that already opens with BOS gets no second one
    long = Encoder(adds_bos, 16).encode({BUILTIN_TASK: "mr", "text": "word " * 50, "label": 0}).input_ids
    assert len(long) == 16 and long[0] == bos and long[1] != bos
    assert Encoder(adds_bos, 64).encode({"text": adds_bos.bos_token + "Colour of the sky?"}).input_ids == text
    # a chat is its template's rendering: no BOS added to it (a template that renders one keeps exactly one)
    assert Encoder(adds_bos, 64).encode({"messages": CHAT}) == Encoder(tokenizer, 64).encode({"messages": CHAT})
    # and nothing changes for a tokenizer that adds no BOS
    assert Encoder(tokenizer, 64).encode({"text": "Colour of the sky?"}).input_ids[:-1] == \
        tokenizer("Colour of the sky?", add_special_tokens=False)["input_ids"]


# ------------------------------------------------------------------------------------------- every chat checked up front

LAST_TURN_THINKS = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n"  # Qwen3-style: only the last answer thinks
                    "{% if m['role'] == 'assistant' and loop.last %}<think></think>{% endif %}"
                    "{{ m['content'] }}<|im_end|>\n{% endfor %}"
                    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_check_tokenizer_renders_every_chat_and_names_the_failing_line(tokenizer, tmp_path):
    thinks = _changed(tokenizer, chat_template=LAST_TURN_THINKS)
    multi = CHAT + [{"role": "user", "content": "And of Italy?"}, {"role": "assistant", "content": "Rome."}]
    data = _jsonl(tmp_path / "chats.jsonl", *[{"messages": CHAT}] * 4, {"text": "a note"}, {"messages": multi})
    records = read_jsonl(data, "sft")
    check_tokenizer(thinks, records[:5])  # single-turn chats render consistently with this template
    with pytest.raises(ConfigError, match=re.escape(f"{data}:6: ") + "the tokenizer's chat template does not render"):
        check_tokenizer(thinks, records)
    with pytest.raises(ConfigError, match="^record 3: "):  # records without a file are named by position
        check_tokenizer(thinks, [{"messages": CHAT}, {"text": "x"}, {"messages": multi}])
    check_tokenizer(tokenizer, records)
    assert records[5] == {"messages": multi}  # records stay plain dicts to everything else


def test_the_encoder_says_when_max_length_cut_a_record(tokenizer):
    from fastft.apps.training.records import BUILTIN_TASK

    long = "word " * 60
    cases = [({"text": long}, "sft"), ({"messages": [{"role": "user", "content": long}, CHAT[1]]}, "sft"),
             ({"prompt": long, "completion": " yes"}, "sft"), ({BUILTIN_TASK: "mr", "text": long, "label": 1}, "sft"),
             ({"prompt": "Q?", "chosen": long, "rejected": " no"}, "dpo"), ({"prompt": long, "chosen": " a",
                                                                           "rejected": " b"}, "dpo")]
    for record, objective in cases:
        encoder = Encoder(tokenizer, 32, objective)
        encoder.encode(record)
        assert encoder.last_cut, record
        encoder = Encoder(tokenizer, 512, objective)
        encoder.encode(record)
        assert not encoder.last_cut, record


def test_a_cut_pair_keeps_where_its_answers_differ(tokenizer):
    """Answers sharing a long opening, cut to half of max_length each, came out identical: a pair with no
    preference (loss ln 2, no gradient). Cut, their common opening goes to the prompt (the same tokens in the same
    context score the same in both documents: they cancel in the loss); answers that fit keep what the prompt leaves,
    not half."""
    opening = ("Sure! Here is a detailed explanation of how photosynthesis works in green plants and algae, "
               "step by step. ")
    record = {"prompt": "Explain photosynthesis.", "chosen": opening + "Light is absorbed.",
              "rejected": opening + "Plants eat soil."}
    encoder = Encoder(tokenizer, 24, "dpo")
    pair = encoder.encode(record)
    assert encoder.last_cut and len(pair.chosen.input_ids) <= 24 and len(pair.rejected.input_ids) <= 24
    chosen = [t for t in pair.chosen.labels if t != IGNORE]
    rejected = [t for t in pair.rejected.labels if t != IGNORE]
    assert chosen != rejected and chosen[0] != rejected[0]  # the first trained tokens are where they differ
    assert tokenizer.decode(chosen).strip().startswith("Light")
    assert tokenizer.decode(rejected).strip().startswith("Plants")
    # the untrained part of both documents is the same context: the end of the shared opening
    assert pair.chosen.input_ids[:-len(chosen)] == pair.rejected.input_ids[:-len(rejected)]
    # fitting whole (a short prompt leaves more than half): the answers whole, the opening trained as before
    whole = Encoder(tokenizer, 64, "dpo")
    pair = whole.encode(record)
    assert not whole.last_cut
    assert tokenizer.decode([t for t in pair.chosen.labels if t != IGNORE]).startswith("Sure!")


def test_a_conversational_pair_opens_as_its_chat_does():
    """With a tokenizer that adds a BOS its chat template does not render, the pair's documents had one that the
    same chat under sft (and the template at inference) has not."""
    from tokenizers import processors

    tok = _llama2_style_tokenizer()
    tok._tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'user' %}{{ 'USER: ' + m['content'] + '\\n' }}"
                         "{% else %}{{ 'ASSISTANT: ' + m['content'] + eos_token + '\\n' }}{% endif %}{% endfor %}"
                         "{% if add_generation_prompt %}{{ 'ASSISTANT: ' }}{% endif %}")
    assert tok("x")["input_ids"][0] == tok.bos_token_id
    rejected = [{"role": "assistant", "content": "Lyon."}]
    pair = Encoder(tok, 128, "dpo").encode({"prompt": CHAT[:1], "chosen": CHAT[1:], "rejected": rejected})
    chat = Encoder(tok, 128).encode({"messages": CHAT})
    assert pair.chosen.input_ids == chat.input_ids and pair.chosen.labels == chat.labels
    assert chat.input_ids[0] != tok.bos_token_id
