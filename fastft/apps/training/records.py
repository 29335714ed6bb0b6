"""Training records: the jsonl forms `fastft train --data` reads (checked line by line, the common forms turned into
the canonical ones), the built-in sets, and the fingerprints a resumed run compares.

Records (one per jsonl line): `{"text": ...}` (every token trained), `{"messages": [...]}` (a chat rendered by
the tokenizer's chat template, loss on assistant turns only), `{"prompt", "completion"}` (TRL's prompt-completion
form: plain text, loss on the completion only) or, for dpo, `{"prompt", "chosen", "rejected"}` (text, or TRL's
conversational form: lists of messages, the prompt left out when chosen and rejected are whole conversations).
The other common forms are read as chats: ShareGPT's `{"conversations": [{"from": "human"/"gpt"/"system",
"value": ...}]}` and Alpaca's `{"instruction", "input", "output"}` (the user turn is the instruction, then the
input after a blank line); a "text" beside their turns (a rendered prompt) is not trained.
Other keys are ignored: the objective, not a record's keys, decides whether it is a pair.
"""
from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

from fastft.apps.datasets import TASK_NAMES, load_task
from fastft.apps.training.config import INSTRUCTIONS, ConfigError, TrainConfig, unreadable

_ROLES = ("system", "user", "assistant")
_PAIR_KEYS = ("prompt", "chosen", "rejected")
_SFT_FIELDS = ("messages", "text", "completion", "conversations", "instruction")  # the forms sft/distill read
# marks the built-in classification records (made by load_records); read_jsonl drops it from user records, so a
# user's own keys ("task", "label", ...) are never taken for it
BUILTIN_TASK = "_fastft_builtin_task"


class DataError(ConfigError):
    """A malformed data file or record; the message names file and line."""


class _Record(dict):
    """A record read from a file: a dict (equal to the plain one) that remembers its "file:line" as `source`, so a
    problem found later (check_tokenizer, with the tokenizer loaded) still names where the record came from."""

    def __init__(self, record: dict, source: str):
        super().__init__(record)
        self.source = source


def where(record, index: int | None = None) -> str:
    source = getattr(record, "source", None)
    if source:
        return source
    return f"record {index + 1}" if index is not None else "a record"


# ----------------------------------------------------------------------------------------------- records

def _record_problem(record, objective: str) -> str | None:
    if not isinstance(record, dict):
        return f"expected a JSON object, got {type(record).__name__}"
    if objective == "dpo":
        if isinstance(record.get("chosen"), list):
            return _conversational_pair_problem(record)
        sft_field = next((k for k in _SFT_FIELDS if k in record), None)
        if sft_field and "chosen" not in record and "rejected" not in record:  # the usual cause: a stray flag
            return (f"'{sft_field}' is a field of sft's records, not of a preference pair: --objective dpo needs "
                    "prompt, chosen and rejected fields; train this file with --objective sft")
        for key in _PAIR_KEYS:
            if not isinstance(record.get(key), str):
                return f"a dpo record needs string fields prompt, chosen, rejected ('{key}' is missing or not text)"
        if not record["prompt"].strip():  # the answers' first token would open the document: never trained
            return "'prompt' is empty; a dpo record needs the prompt the two answers respond to"
        for key in ("chosen", "rejected"):
            if not record[key].strip():  # whitespace alone is no answer either
                return f"'{key}' is empty; a dpo record needs two non-empty answers"
        if record["chosen"] == record["rejected"]:
            return "'chosen' and 'rejected' are the same text: there is no preference to learn"
        return None
    if "text" in record:
        return None if isinstance(record["text"], str) and record["text"].strip() else \
            "'text' must be a non-empty string"
    if "messages" in record:
        messages = record["messages"]
        problem = _messages_problem(messages, "messages")
        if problem:
            return problem
        if not any(m["role"] == "assistant" for m in messages):
            return "'messages' has no assistant turn (nothing to train on)"
        if not any(m["content"].strip() for m in messages if m["role"] == "assistant"):
            return "every assistant turn is empty (it would only train the end-of-turn: stopping at once)"
        return None
    if "completion" in record:
        if not all(isinstance(record.get(k), str) for k in ("prompt", "completion")):
            return ("a prompt-completion record needs string fields prompt and completion (conversational ones, "
                    "lists of messages, go in one 'messages' list)")
        if not record["completion"].strip():
            return "'completion' is empty: nothing to train on"
        if not record["prompt"].strip():  # the completion's first token would open the document: never trained
            return "'prompt' is empty; a record without a prompt is a {\"text\": ...} record"
        return None
    if "chosen" in record and "rejected" in record:  # a preference file without --objective dpo
        return (f"a preference pair (prompt, chosen, rejected): train it with --objective dpo (--objective "
                f"{objective} reads 'text', 'messages' or 'prompt'/'completion' records)")
    if ("instruction" in record) != ("output" in record):  # half an Alpaca record (both: read as its chat)
        return ("an Alpaca record needs 'output' (the answer to train on)" if "instruction" in record else
                "an Alpaca record needs 'instruction' (the user's turn 'output' answers)")
    return ("expected a 'text', 'messages' or 'prompt'/'completion' field (or ShareGPT's 'conversations', Alpaca's "
            "'instruction'/'output')")


def _messages_problem(messages, name: str) -> str | None:
    if not isinstance(messages, list) or not messages:
        return f"'{name}' must be a non-empty list of messages"
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in _ROLES or not isinstance(m.get("content"), str):
            return f"{name}[{i}] must be {{\"role\": one of {'/'.join(_ROLES)}, \"content\": text}}"
    return None


def _conversational_pair_problem(record: dict) -> str | None:
    """TRL's conversational preference forms, after _split_implicit_prompt: prompt, chosen and rejected lists of
    messages, the answers assistant turns."""
    for key in _PAIR_KEYS:
        problem = _messages_problem(record.get(key), key)
        if problem:
            return problem
    for key in ("chosen", "rejected"):
        if record[key][0]["role"] == "assistant" and any(m["role"] != "assistant" for m in record[key]):
            return (f"'{key}' holds a {next(m['role'] for m in record[key] if m['role'] != 'assistant')} turn after "
                    "the assistant's: a pair's answers are the assistant's turns after one shared prompt (chosen "
                    "and rejected must agree on every other turn)")
        if record[key][0]["role"] != "assistant":
            return (f"'{key}' must start with the assistant's answer to the prompt (whole conversations that repeat "
                    "the prompt: leave 'prompt' out, and their shared opening turns become it)")
    if record["chosen"] == record["rejected"]:
        return "'chosen' and 'rejected' are the same messages: there is no preference to learn"
    return None


def _split_implicit_prompt(record: dict) -> dict:
    """TRL's implicit-prompt preference form ({"chosen": [...], "rejected": [...]}, whole conversations sharing
    their opening turns) as the explicit one: the shared turns up to the last one before the answers differ become
    the prompt (as trl's extract_prompt does)."""
    chosen, rejected = record.get("chosen"), record.get("rejected")
    if "prompt" in record or not isinstance(chosen, list) or not isinstance(rejected, list):
        return record
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    while shared and isinstance(chosen[shared - 1], dict) and chosen[shared - 1].get("role") == "assistant":
        shared -= 1  # the answers start at an assistant turn; an identical first one still belongs to them
    return {**record, "prompt": chosen[:shared], "chosen": chosen[shared:], "rejected": rejected[shared:]}


_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "model": "assistant",
                   "system": "system"}


def _as_chat(record: dict) -> dict | str:
    """ShareGPT and Alpaca records as {"messages": [...]} (the record itself for every other form), or a problem.
    A record that has one of the canonical fields keeps it (as "text" wins over "messages"), except a ShareGPT or
    Alpaca record's "text" (tatsu-lab/alpaca ships its whole rendered prompt there, human turns and all): their
    turns decide, the assistant's alone trained."""
    alpaca = "instruction" in record and "output" in record and "messages" not in record
    sharegpt = "conversations" in record and "messages" not in record
    if any(k in record for k in ("text", "messages", "completion")) and not (alpaca or sharegpt):
        return record
    if "conversations" in record:
        turns = record["conversations"]
        if not isinstance(turns, list) or not turns:
            return "'conversations' must be a non-empty list"
        messages = []
        for i, turn in enumerate(turns):
            who = turn.get("from", turn.get("role")) if isinstance(turn, dict) else None
            text = turn.get("value", turn.get("content")) if isinstance(turn, dict) else None
            if who not in _SHAREGPT_ROLES or not isinstance(text, str):
                return (f"conversations[{i}] must be {{\"from\": one of {'/'.join(_SHAREGPT_ROLES)}, \"value\": "
                        "text}")
            messages.append({"role": _SHAREGPT_ROLES[who], "content": text})
        system = record.get("system")  # LLaMA-Factory's form keeps the system prompt beside the turns
        if system is not None and not isinstance(system, str):
            return f"'system' must be text, got {type(system).__name__}"
        turn = next((i for i, m in enumerate(messages) if m["role"] == "system"), None)
        if system and turn is None:
            messages.insert(0, {"role": "system", "content": system})
        elif system and system.strip() != messages[turn]["content"].strip():  # one of them was dropped unannounced
            return (f"'system' differs from the system turn conversations[{turn}]: a chat has one system prompt; "
                    "keep one of them")
        answers = [m["content"] for m in messages if m["role"] == "assistant"]
        if not answers:  # named in the file's own terms: its lines have no 'messages' field
            return "'conversations' has no gpt (assistant) turn: nothing to train on"
        if not any(a.strip() for a in answers):
            return "every gpt (assistant) turn of 'conversations' is empty (it would only train stopping at once)"
        return _read_as_chat(record, messages)
    if alpaca:
        optional = {k: record.get(k) for k in ("input", "system")}
        wrong = next((k for k, v in optional.items() if v is not None and not isinstance(v, str)), None)
        if wrong:
            return f"an Alpaca record's '{wrong}' must be text, got {type(optional[wrong]).__name__}"
        instruction, extra, output = record["instruction"], optional["input"] or "", record["output"]
        system, history = optional["system"] or "", record.get("history") or []
        if not all(isinstance(v, str) for v in (instruction, extra, output, system)) or not instruction.strip():
            return "an Alpaca record needs string fields instruction (non-empty), output and optionally input, system"
        if not output.strip():
            return "an Alpaca record's 'output' is empty: nothing to train on"
        pairs = all(isinstance(turn, list) and len(turn) == 2 and all(isinstance(t, str) for t in turn)
                    for turn in history) if isinstance(history, list) else False
        if not pairs:
            return "an Alpaca record's 'history' must be a list of [instruction, output] pairs"
        user = instruction + ("\n\n" + extra if extra else "")
        messages = [{"role": "system", "content": system}] if system else []
        for earlier, answer in history:  # LLaMA-Factory's earlier turns, trained as a chat's are
            messages += [{"role": "user", "content": earlier}, {"role": "assistant", "content": answer}]
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
        return _read_as_chat(record, messages)
    return record


def _read_as_chat(record: dict, messages: list[dict]) -> dict:
    return {**{k: v for k, v in record.items() if k != "text"}, "messages": messages}  # the rendered text: not trained


# files that are not JSON Lines, by their first bytes: what they are, and what to do
_OTHER_FORMATS = ((b"\x1f\x8b", "gzip-compressed; decompress it first (gunzip)"),
                  (b"PAR1", "a Parquet file; write it as JSON Lines (e.g. pandas: df.to_json(path, orient='records', "
                            "lines=True))"),
                  (b"\xff\xfe", "UTF-16 text; convert it to UTF-8 (e.g. iconv -f utf-16 -t utf-8)"),
                  (b"\xfe\xff", "UTF-16 text; convert it to UTF-8 (e.g. iconv -f utf-16 -t utf-8)"))
_JSON_ARRAY = ("a JSON array (one document), not JSON Lines; --data needs one JSON object per line (e.g. "
               "python -c \"import json,sys; [print(json.dumps(r)) for r in json.load(open(sys.argv[1]))]\" FILE)")


def read_jsonl(path: str | Path, objective: str) -> list[dict]:
    """Every record of a jsonl file, checked; a DataError names the file and line of the first bad one."""
    try:
        return _read_jsonl(path, objective)
    except OSError as e:  # permissions, a failing disk: one line, not a traceback
        raise DataError(unreadable(path, e)) from None


def _read_jsonl(path: str | Path, objective: str) -> list[dict]:
    records = []
    with open(path, "rb") as f:  # bytes, decoded line by line: a decoding error then names its line
        start = f.read(4)
        f.seek(0)
        for magic, what in _OTHER_FORMATS:
            if start.startswith(magic):
                raise DataError(f"{path}: {what}")
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")  # a byte-order mark may open the file
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{lineno}: not UTF-8 text (byte 0x{raw[e.start]:02x} at byte {e.start + 1}); "
                                "the data file must be UTF-8: convert it (e.g. iconv -f latin1 -t utf-8)") from None
            if not line.strip():
                continue
            if not records and line.lstrip().startswith("["):
                raise DataError(f"{path}:{lineno}: {_JSON_ARRAY}")
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
            try:  # an escaped lone surrogate ("\ud83d") parses, but no tokenizer can encode it
                if "\\u" in line:
                    json.dumps(record, ensure_ascii=False).encode("utf-8")
            except UnicodeEncodeError:
                raise DataError(f"{path}:{lineno}: holds a lone UTF-16 surrogate escape (half of a character such as "
                                "an emoji, e.g. \\ud83d): not valid Unicode; fix or drop the record") from None
            if objective != "dpo" and isinstance(record, dict):
                record = _as_chat(record)
                if isinstance(record, str):
                    raise DataError(f"{path}:{lineno}: {record}")
            elif isinstance(record, dict):
                record = _split_implicit_prompt(record)
            problem = _record_problem(record, objective)
            if problem:
                raise DataError(f"{path}:{lineno}: {problem}")
            record.pop(BUILTIN_TASK, None)
            records.append(_Record(record, f"{path}:{lineno}"))
    if not records:
        raise DataError(f"{path}: no records")
    return records


INSTRUCTION_TASKS = ("mr", "sms-spam")  # the tasks the built-in instruction set is phrased for


def builtin_instructions(seed: int) -> tuple[list[dict], list[dict]]:
    """(train, eval) chat records from the classification tasks' real text; eval from their held-out splits."""
    def records(rows_by_task, rng):
        out = []
        for name, rows in rows_by_task.items():
            for text, label in rows:
                if name == "mr":
                    word = ("negative", "positive")[label]
                    if rng.random() < 0.7:
                        out.append([f"Is this movie review positive or negative?\n\n{text}", word])
                    else:
                        out.append([f"Write a short {word} movie review.", text])
                else:
                    out.append([f"Is this SMS message spam? Answer yes or no.\n\n{text}", ("no", "yes")[label]])
        rng.shuffle(out)
        return [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in out]

    tasks = {name: load_task(name, seed=seed) for name in INSTRUCTION_TASKS}
    rng = random.Random(seed)
    return (records({n: t.train for n, t in tasks.items()}, rng), records({n: t.eval for n, t in tasks.items()}, rng))


def builtin_preferences(task_name: str, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, eval) preference records from a classification task: the right label word is chosen."""
    task = load_task(task_name, seed=seed)

    def pairs(rows):
        words = task.label_words  # rejected: the next label's word (never the chosen one, also for 3+ classes)
        return [{"prompt": task.template.format(text=text), "chosen": words[label],
                 "rejected": words[(label + 1) % len(words)]} for text, label in rows]
    return pairs(task.train), pairs(task.eval)


def load_records(cfg: TrainConfig) -> tuple[list[dict], list[dict], str]:
    """(train, eval, description) records for the configured data, objective-appropriate. No tokenizer needed,
    so this runs before any model is loaded."""
    if cfg.data is not None:
        train = read_jsonl(cfg.data, cfg.objective)
        total = len(train)  # the file's count: the description names the file, not the split
        if cfg.eval_data is not None:
            evaluation = read_jsonl(cfg.eval_data, cfg.objective)[: cfg.eval_examples]
        else:
            held = min(cfg.eval_examples, len(train) // 10)
            train, evaluation = (train[:-held], train[-held:]) if held else (train, [])
        return train, evaluation, f"{cfg.data} ({total} records)"
    if cfg.task == INSTRUCTIONS:
        if cfg.objective == "dpo":
            raise ConfigError(f"--objective dpo has no built-in data for --task {INSTRUCTIONS}; "
                              f"use a classification --task ({', '.join(TASK_NAMES)}) or --data")
        train, evaluation = builtin_instructions(cfg.seed)
        return train, evaluation[: cfg.eval_examples], "built-in instruction set (MR + SMS spam as chat)"
    if cfg.objective == "dpo":
        train, evaluation = builtin_preferences(cfg.task, cfg.seed)
        return train, evaluation[: cfg.eval_examples], f"{cfg.task} as preference pairs (right vs wrong label word)"
    task = load_task(cfg.task, seed=cfg.seed)
    train = [{BUILTIN_TASK: cfg.task, "text": t, "label": y} for t, y in task.train]
    evaluation = [{BUILTIN_TASK: cfg.task, "text": t, "label": y} for t, y in task.eval[: cfg.eval_examples]]
    return train, evaluation, f"{task.description} (split seed {cfg.seed})"


def file_fingerprint(path: str | Path) -> dict:
    """Size and sha256 of a data file: a checkpoint records them, so data changed at the same path is seen."""
    digest, size = hashlib.sha256(), 0
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
                size += len(block)
    except OSError as e:
        raise DataError(unreadable(path, e)) from None
    return {"size": size, "sha256": digest.hexdigest()}


def data_fingerprint(cfg: TrainConfig) -> dict:
    """--data's and --eval-data's fingerprints (None where not given: the built-in sets are named by --task and
    --seed, and their records by the BatchPlan's digest)."""
    return {name: file_fingerprint(getattr(cfg, name)) if getattr(cfg, name) is not None else None
            for name in ("data", "eval_data")}


def records_digest(records: list[dict]) -> str:
    """sha256 of the records in order: which records a run trains on, whatever produced them."""
    digest = hashlib.sha256()
    for record in records:
        digest.update(json.dumps(record, sort_keys=True, ensure_ascii=False).encode() + b"\n")
    return digest.hexdigest()
