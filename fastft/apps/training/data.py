"""Training data: local jsonl files and the built-in sets, tokenized into documents, packed without padding.

Records (`fastft.apps.training.records`: the jsonl forms, the built-in sets) become Examples and Pairs here.
The built-in classification tasks become prompt → label-word documents; the built-in instruction set turns
the same real text into chat instructions ("Is this review positive or negative?" → "positive", and "Write a
positive movie review." → a real review), generated deterministically, no network.

A micro-batch is one packed row (`fastft.integration.packing.PackingCollator`): documents back to back,
position_ids restarting per document. transformers gives sdpa/eager a block-diagonal causal mask from those
position_ids (masking_utils.find_packed_sequence_indices); attn_implementation="fastft" runs varlen attention
over the collator's cu_seq_lens. No document attends to another, nor predicts across a boundary. Some
architectures build their mask without position_ids (OPT, BioGPT, XGLM; BLOOM and MPT take none): the trainer finds
them with a probe (objectives.packing_isolates) and runs their documents one at a time.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from fastft.apps.datasets import load_task
from fastft.apps.training.config import ConfigError
from fastft.apps.training.records import BUILTIN_TASK, where
from fastft.integration.packing import IGNORE_INDEX, PackingCollator


@dataclass
class Example:
    """One document: labels are the input_ids where trained, IGNORE_INDEX elsewhere (not shifted)."""
    input_ids: list[int]
    labels: list[int]
    choices: tuple[int, ...] | None = None  # classification: the label words' token ids


@dataclass
class Pair:
    """A preference pair: two documents sharing a prompt."""
    chosen: Example
    rejected: Example


# ---------------------------------------------------------------------------------------------- tokenizing

class Encoder:
    """Records → Examples / Pairs for one tokenizer, memoised (records are encoded when first batched).

    objective: the run's --objective; under dpo every record is a pair, under the others none is.
    """

    def __init__(self, tokenizer, max_length: int, objective: str = "sft"):
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.objective = objective
        self._label_ids: dict[str, tuple[int, ...]] = {}
        self._templates: dict[str, str] = {}
        self._lead_ids: list[int] | None = None
        self._header: str | None = None
        self.last_cut = False

    @property
    def eos(self) -> int:
        # Text documents and dpo answers end with it, so the model learns to stop; training them without it
        # would teach a model that never ends, so a tokenizer without one is refused rather than worked around.
        eos = self.tokenizer.eos_token_id
        if eos is None:
            raise ConfigError("the tokenizer has no end-of-sequence token, which text records and dpo answers end "
                              "with; set one (\"eos_token\" in its tokenizer_config.json, or tokenizer.eos_token)")
        return eos

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    @property
    def lead(self) -> list[int]:
        """The special tokens the tokenizer puts before a text (BOS for Llama/Mistral-style tokenizers, none for
        SmolLM2/Qwen); any it puts after one (add_eos_token=True) are not part of it."""
        if self._lead_ids is None:
            probe = "Hello"
            full, plain = self.tokenizer(probe)["input_ids"], self._ids(probe)
            self._lead_ids = next((full[:k] for k in range(len(full) - len(plain) + 1)
                                   if full[k: k + len(plain)] == plain), [])
        return self._lead_ids

    def _document_ids(self, text: str) -> list[int]:
        """A plain-text document's start (text record, dpo prompt, classification prompt): the text tokenized with
        the tokenizer's leading special tokens, so every kind of document starts the same way, and without a
        second BOS when the text already opens with one. Trailing special tokens (add_eos_token) are left out:
        the callers end documents themselves."""
        return self._with_lead(self._ids(text))

    def _with_eos(self, ids: list[int]) -> list[int]:
        """ids ending with end of sequence: appended only when they do not already end with it (TRL's rule)."""
        return ids if ids and ids[-1] == self.eos else ids + [self.eos]

    def _cut_left(self, ids: list[int], room: int) -> list[int]:
        """At most `room` tokens of a prompt, its earliest text dropped first; its leading special tokens stay."""
        if len(ids) <= room:
            return ids
        self.last_cut = True
        lead = len(self.lead) if ids[: len(self.lead)] == self.lead and room > len(self.lead) else 0
        return ids[:lead] + ids[len(ids) - (room - lead):]

    def label_ids(self, task_name: str) -> tuple[int, ...]:
        if task_name not in self._label_ids:
            task = load_task(task_name)
            self._templates[task_name] = task.template
            ids = []
            for word in task.label_words:
                tokens = self._ids(word)
                if len(tokens) != 1:
                    raise ConfigError(f"task {task_name}: label word {word!r} is {len(tokens)} tokens for this "
                                      "tokenizer; label words must be single tokens")
                ids.append(tokens[0])
            self._label_ids[task_name] = tuple(ids)
        return self._label_ids[task_name]

    def kind(self, record: dict) -> str:
        """"pair", "classification", "text", "chat" or "completion"; "text" wins over "messages", and "messages"
        over "completion", as in _record_problem."""
        if self.objective == "dpo":
            return "pair"
        if BUILTIN_TASK in record:
            return "classification"
        return "text" if "text" in record else "chat" if "messages" in record else "completion"

    def encode(self, record: dict):
        """The record's Example (Pair under dpo); `last_cut` then says whether --max-length cut it."""
        self.last_cut = False
        kind = self.kind(record)
        if kind == "pair":
            return self.pair(record)
        if kind == "classification":
            return self.classification(record)
        if kind == "chat":
            return self.chat(record["messages"])
        if kind == "completion":
            return self.completion(record)
        ids = self._with_eos(self._document_ids(record["text"]))
        self.last_cut = len(ids) > self.max_length
        ids = ids[: self.max_length]
        return Example(ids, list(ids))

    def classification(self, record: dict) -> Example:
        """Prompt cut from the left (the template's tail stays) + the label word, the only trained token."""
        name = record[BUILTIN_TASK]
        choices = self.label_ids(name)
        prompt = self._cut_left(self._document_ids(self._templates[name].format(text=record["text"])),
                                self.max_length - 1)
        return Example(prompt + [choices[record["label"]]], [IGNORE_INDEX] * len(prompt) + [choices[record["label"]]],
                       choices)

    def _prompt_and_answer(self, prompt: str, answer: str) -> tuple[list[int], list[int]]:
        """(prompt ids with the tokenizer's leading special tokens, answer ids) of prompt + answer tokenized whole as
        a chat is (_tokenized_pieces: a SentencePiece tokenizer adds no "▁" before the answer; a token across the
        answer's start is split where the tokenizer can, else it goes with the answer)."""
        ids, labels = self._tokenized_pieces([(prompt, False), (answer, True)])
        first = _first_trained(labels)
        return self._with_lead(ids[:first]), ids[first:]

    def _with_lead(self, ids: list[int]) -> list[int]:
        """ids opening with the tokenizer's leading special tokens (added when not there already)."""
        return ids if ids[: len(self.lead)] == self.lead else self.lead + ids

    def completion(self, record: dict) -> Example:
        """TRL's prompt-completion form: the prompt (a plain-text document's start, untrained) then the completion
        with end of sequence (trained), tokenized whole as TRL does, except that a token across the answer's start
        (a prompt ending "nu", a completion starting "rho") is split there where the tokenizer can, so that the
        answer's first token is its own (_prompt_and_answer; TRL trains "ur" whole). Too long, it keeps the
        max_length tokens that end with the completion (the prompt is cut from its left), as a chat keeps its last
        answer."""
        prompt, answer = self._prompt_and_answer(record["prompt"], record["completion"])
        answer = self._with_eos(answer)
        ids, labels = prompt + answer, [IGNORE_INDEX] * len(prompt) + answer
        if len(ids) > self.max_length:
            self.last_cut = True
            lead = self.lead if prompt[: len(self.lead)] == self.lead and len(answer) < self.max_length else []
            keep = self.max_length - len(lead)
            ids, labels = lead + ids[-keep:], [IGNORE_INDEX] * len(lead) + labels[-keep:]
        return Example(ids, labels)

    def chat(self, messages: list[dict]) -> Example:
        """The template rendered after each turn; the text each assistant turn adds is trained (its end-of-turn
        token included, so the model learns to stop), the rest (system, user, generation prompts) is not.

        A chat longer than max_length keeps its first max_length tokens if they hold its last trained token,
        else the max_length tokens that end at it: the earliest context is dropped (as a classification prompt
        is cut from its left), never the final answer and its end-of-turn."""
        ids, labels = self._tokenized_pieces(self.chat_pieces(messages))
        last = max((i for i, label in enumerate(labels) if label != IGNORE_INDEX), default=0)
        start = max(0, last + 1 - self.max_length)
        self.last_cut = len(ids) > self.max_length
        lead = len(self.lead) if ids[: len(self.lead)] == self.lead and len(self.lead) < self.max_length else 0
        if start and lead:  # cut from the left: the template's leading special tokens (a BOS) stay, as _cut_left's
            start += lead
            return Example(ids[:lead] + ids[start: last + 1], [IGNORE_INDEX] * lead + labels[start: last + 1])
        return Example(ids[start: start + self.max_length], labels[start: start + self.max_length])

    def _tokenized_pieces(self, pieces: list[tuple[str, bool]]) -> tuple[list[int], list[int]]:
        """(ids, labels) of the pieces' text tokenized whole, as the rendered chat is at inference: tokenized piece
        by piece, a SentencePiece tokenizer that prepends "▁" to every string (Llama-2, Mistral) would add a token
        before each answer that the model never sees when it generates. Where an answer begins, though, a token
        is never shared with the text before it where the tokenizer can split it: whole, the template's "\n" after
        the role and an answer's leading blank line merge into one "\n\n" token, trained after a context
        ("...assistant") that generation, whose prompt ends with the "\n", never has; such a token is split there,
        each side tokenized alone (_split_token). A token is trained when its text overlaps a trained piece. A
        tokenizer without offsets (a slow, Python one) tokenizes piece by piece."""
        if not getattr(self.tokenizer, "is_fast", False):
            ids, labels = [], []
            for text, trained in pieces:
                piece = self._ids(text)
                ids += piece
                labels += piece if trained else [IGNORE_INDEX] * len(piece)
            return ids, labels
        text = "".join(piece for piece, _ in pieces)
        trained_chars = bytearray(len(text) + 1)  # 1 where the character is trained (a sentinel at the end)
        answer_starts, at, before = [], 0, False
        for piece, trained in pieces:
            if trained:
                trained_chars[at: at + len(piece)] = b"\x01" * len(piece)
                if not before:
                    answer_starts.append(at)
            at, before = at + len(piece), trained
        ids, spans = [], []
        for token, (start, end) in zip(*self._with_offsets(text)):
            cuts = [b for b in answer_starts if start < b < end]
            split = self._split_token(text, token, [start, *cuts, end]) if cuts else None
            if split is None:
                ids.append(token)
                spans.append((start, end))
            else:
                ids += split[0]
                spans += split[1]
        labels = [i if any(trained_chars[start: max(end, start + 1)]) else IGNORE_INDEX
                  for i, (start, end) in zip(ids, spans)]
        return ids, labels

    def _split_token(self, text: str, token: int, bounds: list[int]):
        """(ids, spans) of text[bounds[0]:bounds[-1]] (one token's text) tokenized apart at the inner bounds, or None
        when the parts do not spell the token: a tokenizer that puts "▁" before every string it tokenizes
        (SentencePiece's legacy normalizer, Metaspace) would add one to each part, so such a token stays whole."""
        ids, spans = [], []
        for left, right in zip(bounds, bounds[1:]):
            part, offsets = self._with_offsets(text[left:right])
            ids += part
            spans += [(left + a, left + b) for a, b in offsets]
        spell = self.tokenizer.convert_ids_to_tokens
        return (ids, spans) if "".join(spell(ids)) == spell(token) else None

    def _with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        encoded = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return encoded["input_ids"], encoded["offset_mapping"]

    def chat_pieces(self, messages: list[dict]) -> list[tuple[str, bool]]:
        """The chat's text in consecutive pieces, each with whether it is trained; string-level (no tokenizing),
        so check_tokenizer runs it over every chat. Before an assistant turn comes the untrained text the template
        renders up to that turn's content: the generation prompt after earlier turns, and for a chat that opens
        with the assistant, what the template renders before a lone assistant message's content (a default
        system prompt, the role header), as it would be after an explicit system message."""
        template = self.tokenizer.apply_chat_template
        pieces, done = [], ""
        for i, message in enumerate(messages):
            texts = []
            if message["role"] == "assistant":
                texts.append((template(messages[:i], tokenize=False, add_generation_prompt=True) if i
                              else self._assistant_header(), False))
            texts.append((template(messages[: i + 1], tokenize=False), message["role"] == "assistant"))
            for text, trained in texts:
                if not text.startswith(done):
                    raise ConfigError("the tokenizer's chat template does not render a conversation as a prefix of "
                                      "its continuation; convert the chats to {\"text\": ...} records")
                if len(text) > len(done):
                    pieces.append((text[len(done):], trained))
                done = text
        return pieces

    _SENTINEL = "\u2063fastft-assistant-content\u2063"

    def _assistant_header(self) -> str:
        """What the template renders before the content of a chat's opening assistant message."""
        if self._header is None:
            rendered = self.tokenizer.apply_chat_template([{"role": "assistant", "content": self._SENTINEL}],
                                                          tokenize=False)
            if rendered.count(self._SENTINEL) != 1:
                raise ConfigError("the tokenizer's chat template does not render an assistant message's content "
                                  "verbatim, so a chat that opens with the assistant cannot be split into trained "
                                  "and untrained text; start such chats with a system or user message")
            self._header = rendered[: rendered.index(self._SENTINEL)]
        return self._header

    def pair(self, record: dict) -> Pair:
        """Responses (with end of sequence) keep what the prompt leaves of max_length, at least half of it; cut,
        their common opening goes to the prompt first (it cancels in the loss); the prompt is cut from its left.
        Conversational pairs (lists of messages) are rendered by the chat template: the prompt with the generation
        prompt, each answer as the text the template adds after it (its end-of-turn included, no extra end of
        sequence), each tokenized with the prompt as a chat's answer is (_shared_prompt), where text pairs
        tokenize prompt and answers alone (as TRL does)."""
        if isinstance(record["chosen"], list):
            prompt, answers = self._shared_prompt(self.rendered_pair(record))
        else:
            prompt = self._document_ids(record["prompt"])
            answers = [self._with_eos(self._ids(record[k])) for k in ("chosen", "rejected")]
        room = self._answer_room(prompt)
        self.last_cut = any(len(answer) > room for answer in answers)
        if self.last_cut:
            # the answers' common opening moves into the prompt: its tokens score the same in both documents
            # (same context), so they cancel in the loss, and the cut keeps where the answers differ (cut to
            # `room` as they were, two answers sharing a long opening came out identical: a pair with no gradient)
            common = next((i for i, (a, b) in enumerate(zip(*answers)) if a != b), min(map(len, answers)))
            prompt, answers = prompt + answers[0][:common], [answer[common:] for answer in answers]
            room = self._answer_room(prompt)
        if answers[0] == answers[1]:  # the texts differ (read_jsonl refuses equal ones), the tokens do not
            raise ConfigError(f"{where(record)}: 'chosen' and 'rejected' are the same tokens once encoded (an end of "
                              "sequence written into one answer, or message fields the chat template does not "
                              "render): there is no preference to learn; fix or drop the record")
        responses = [answer[:room] for answer in answers]
        prompt = self._cut_left(prompt, max(self.max_length - max(len(r) for r in responses), 1))
        chosen, rejected = (Example(prompt + r, [IGNORE_INDEX] * len(prompt) + r) for r in responses)
        return Pair(chosen, rejected)

    def _answer_room(self, prompt: list[int]) -> int:
        """Tokens an answer may keep: what the prompt leaves, at least half of max_length."""
        return max(self.max_length // 2, self.max_length - len(prompt))

    def _shared_prompt(self, rendered: dict) -> tuple[list[int], list[list[int]]]:
        """(prompt, [chosen answer, rejected answer]), each answer tokenized whole with the prompt, the prompt the
        tokens both documents share up to the first trained one of either: where a token across the answer's start
        stays whole (SentencePiece), it goes with the answer in both, so the two documents still share one prompt
        and neither reward scores a prompt token the other does not."""
        whole = [self._tokenized_pieces([(rendered["prompt"], False), (rendered[k], True)])
                 for k in ("chosen", "rejected")]
        (c_ids, c_labels), (r_ids, r_labels) = whole
        common = next((i for i, (a, b) in enumerate(zip(c_ids, r_ids)) if a != b), min(len(c_ids), len(r_ids)))
        n = min(common, _first_trained(c_labels), _first_trained(r_labels))
        return c_ids[:n], [c_ids[n:], r_ids[n:]]  # as chat() and the template tokenize it: no added lead

    def rendered_pair(self, record: dict) -> dict:
        """A conversational pair as text: the prompt rendered with the generation prompt, each answer the text the
        template renders after it."""
        template = self.tokenizer.apply_chat_template
        prompt = template(record["prompt"], tokenize=False, add_generation_prompt=True)
        out = {"prompt": prompt}
        for key in ("chosen", "rejected"):
            whole = template(record["prompt"] + record[key], tokenize=False)
            if not whole.startswith(prompt) or len(whole) == len(prompt):
                raise ConfigError("the tokenizer's chat template does not render a conversation as a prefix of its "
                                  "continuation; give dpo records as text (prompt, chosen, rejected strings)")
            out[key] = whole[len(prompt):]
        return out


def _may_encode_alike(record: dict, eos: str | None) -> bool:
    """Whether a pair's answers, different as read (read_jsonl), may still encode to the same tokens: text ones the
    same but for an end of sequence written at the end of one (it is appended where missing), conversational ones
    with the same roles and contents (the template may not render their other fields)."""
    chosen, rejected = record["chosen"], record["rejected"]
    if isinstance(chosen, str):
        return bool(eos) and chosen.removesuffix(eos) == rejected.removesuffix(eos)
    return [(m["role"], m["content"]) for m in chosen] == [(m["role"], m["content"]) for m in rejected]


def check_tokenizer(tokenizer, records: list[dict], objective: str = "sft") -> None:
    """Fail before the model loads when the tokenizer cannot encode the data (no chat template, no end of
    sequence, ...): one record of each kind is encoded, and every chat is rendered turn by turn (string-level,
    no tokenizing), since a template may break only on some chats (multi-turn ones, say); the error names the
    record's file and line."""
    encoder = Encoder(tokenizer, 64, objective)
    first = {}
    for index, record in enumerate(records):
        kind = encoder.kind(record)
        first.setdefault(kind, (index, record))
        if kind == "pair" and _may_encode_alike(record, tokenizer.eos_token):
            encoder.encode(record)  # refuses answers that are the same tokens (Encoder.pair), now, not mid-run
        conversational = kind == "pair" and isinstance(record.get("chosen"), list)
        if kind != "chat" and not conversational:
            continue
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError(f"{where(record, index)}: a chat record (messages; ShareGPT and Alpaca lines are read "
                              "as chats), but the tokenizer has no chat template; give a --model whose tokenizer has "
                              "one, or write the data as {\"prompt\", \"completion\"} or {\"text\"} records")
        try:
            encoder.chat_pieces(record["messages"]) if kind == "chat" else encoder.rendered_pair(record)
        except Exception as e:  # the template's own errors too (e.g. "roles must alternate")
            problem = str(e) if isinstance(e, ConfigError) else f"the chat template fails on it: {e}"
            raise ConfigError(f"{where(record, index)}: {problem}") from None
    for _, record in first.values():
        encoder.encode(record)


# --------------------------------------------------------------------------------------------------- batches

def documents(items) -> list[Example]:
    """Examples in packing order; a pair contributes its chosen then its rejected document."""
    out = []
    for item in items:
        out += [item.chosen, item.rejected] if isinstance(item, Pair) else [item]
    return out


def bucket_length(n: int) -> int:
    """The smallest m·2**k ≥ n with 8 ≤ m ≤ 16, at least 16: eight lengths per doubling, at most 1/8 more than n."""
    if n <= 16:
        return 16
    shift = n.bit_length() - 4
    return -(-n >> shift) << shift


def pack(items, *, pad_token_id: int, flash_kwargs: bool, bucket: bool = False) -> dict:
    """One packed row for a micro-batch of Examples or Pairs; `document_ids` maps each token to its document.

    bucket: pad the row up to bucket_length with filler documents (pad tokens, no labels), each no longer than the
    longest real one (positions past any real document's would index past learned position embeddings, or move a
    rotary scaling read from the largest position), and the target positions with repeats of the last real token's
    row (its shifted label is a filler's first: ignored): a few shapes per run, so compiled graphs and CUDA graphs
    are replayed instead of made anew. With flash_kwargs, cu_seq_lens is padded with empty documents to a count
    fixed by the number of real ones, and max_length_q/k is the longest document's length rounded up to a power of
    two. `num_tokens` and `num_targets` count the real ones, `num_documents` the real documents."""
    docs = documents(items)
    lengths = [len(d.input_ids) for d in docs]
    tokens, longest = sum(lengths), max(lengths)
    features = [{"input_ids": d.input_ids, "labels": d.labels} for d in docs]
    fillers = []
    if bucket:
        filler = bucket_length(tokens + 1) - tokens
        fillers = [min(longest, filler - start) for start in range(0, filler, longest)]
        features += [{"input_ids": [pad_token_id] * n, "labels": [IGNORE_INDEX] * n} for n in fillers]
    batch = PackingCollator(pad_token_id=pad_token_id, return_flash_kwargs=flash_kwargs)(features)
    lengths += fillers
    batch["document_ids"] = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[None]
    batch["num_documents"] = len(docs)
    batch["num_tokens"] = tokens
    batch["document_lengths"] = lengths  # on the host: runs of one document each slice without a device read
    # where the shifted row carries a loss, found here on the host: the model's forward then gathers with a known
    # index (no data-dependent boolean mask: no device sync, and no graph break under torch.compile)
    at = (batch["labels"][:, 1:] != IGNORE_INDEX).reshape(-1).nonzero()[:, 0]
    batch["num_targets"] = at.numel()
    if bucket:
        at = torch.cat([at, at.new_full((bucket_length(at.numel()) - at.numel(),), tokens - 1)])
        if flash_kwargs:
            # fillers are at most ~1/8 of the row, documents at least 1/len(docs) of it: len(docs) // 8 + 2 of
            # them at most (but in rows under 16 tokens)
            cu = batch["cu_seq_lens_q"]
            cu = torch.cat([cu, cu[-1:].expand(max(0, len(docs) + len(docs) // 8 + 3 - cu.numel()))])
            batch["cu_seq_lens_q"] = batch["cu_seq_lens_k"] = cu
            batch["max_length_q"] = batch["max_length_k"] = 1 << (longest - 1).bit_length()
    batch["target_positions"] = at
    choices = [d.choices for d in docs]
    if all(c is not None for c in choices):
        batch["choices"] = torch.tensor(choices)
    return batch


class BatchPlan:
    """Which records each step trains on, as a cursor that a checkpoint stores.

    Every step takes the next `processes × grad_accum × batch_size` records of a seeded per-epoch order;
    process r's micro-batch m holds the slice (m·processes + r)·batch_size of them. The global set of a step
    depends only on the global batch size, so 2 processes × batch 4 train on what 1 process × batch 8 does.
    An epoch's tail shorter than a step is skipped.
    """

    def __init__(self, num_records: int, batch_size: int, grad_accum: int, processes: int, seed: int,
                 records: str | None = None):
        self.records = records  # records_digest of the training records: a resumed run must train on the same
        self.num_records, self.processes = num_records, processes
        self.batch_size, self.grad_accum = batch_size, grad_accum
        self.per_step = processes * grad_accum * batch_size
        if self.per_step > num_records:
            raise ConfigError(f"one step needs {self.per_step} records (processes × --grad-accum × --batch-size) "
                              f"but the data has {num_records}")
        self.seed = seed
        self.epoch, self.index = 0, 0
        self.order_rule = ORDER_RULE
        self._order = None

    def _epoch_order(self) -> list[int]:
        if self._order is None or self._order[0] != self.epoch:
            g = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch, self.order_rule))
            self._order = (self.epoch, torch.randperm(self.num_records, generator=g).tolist())
        return self._order[1]

    def next_step(self, rank: int) -> list[list[int]]:
        """Record indices of this process's micro-batches for the next step."""
        if self.index + self.per_step > self.num_records:
            self.epoch, self.index = self.epoch + 1, 0
        order = self._epoch_order()[self.index: self.index + self.per_step]
        self.index += self.per_step
        bs = self.batch_size
        return [order[(m * self.processes + rank) * bs: (m * self.processes + rank + 1) * bs]
                for m in range(self.grad_accum)]

    def peek_step(self, rank: int) -> list[list[int]]:
        """What next_step will return, without moving the cursor (a checkpoint written before it stores it)."""
        cursor = self.epoch, self.index
        try:
            return self.next_step(rank)
        finally:
            self.epoch, self.index = cursor

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "per_step": self.per_step, "seed": self.seed,
                "num_records": self.num_records, "records": self.records, "order_rule": self.order_rule}

    def load_state_dict(self, state: dict) -> None:
        """Refused when the steps would take other records: another step size or seed, or other training records
        (checkpoints written before the records were recorded are not checked for them)."""
        saved_count = state.get("num_records", self.num_records)
        if saved_count != self.num_records:
            problem = f"the checkpoint's run trained on {saved_count} records, this run has {self.num_records}"
        elif state.get("records") not in (None, self.records):
            problem = f"this run's {self.num_records} training records differ from those the checkpoint's run had"
        else:
            problem = None
        if problem:
            raise ConfigError(f"--resume: {problem}; resume with the same data (--data, --task, --seed) and, for "
                              "--data without --eval-data, the same --eval-examples (it sets the held-out split)")
        if state["per_step"] != self.per_step or state["seed"] != self.seed:
            raise ConfigError(f"--resume: the checkpoint was written with {state['per_step']} records a step and "
                              f"seed {state['seed']}, this run has {self.per_step} and {self.seed}; resume with the "
                              "same number of processes, --grad-accum, --batch-size and --seed")
        self.epoch, self.index = state["epoch"], state["index"]
        # a run started before the rule changed keeps its own (its epoch's remaining records, then its next orders)
        rule = state.get("order_rule", "seed+epoch")
        if rule not in ("seed+epoch", ORDER_RULE):
            raise ConfigError(f"--resume: the checkpoint orders its records by {rule!r}, which this fastft does not "
                              "know; resume with the fastft version that wrote it")
        self.order_rule = rule


ORDER_RULE = "sha256(seed:epoch)"


def epoch_seed(seed: int, epoch: int, rule: str = ORDER_RULE) -> int:
    """The seed of an epoch's record order. "seed+epoch" (runs checkpointed before the rule changed) made --seed 0's
    epoch 1 the order of --seed 1's epoch 0: runs with neighbouring seeds trained on the same orders, shifted by an
    epoch. Now a hash of both, so every (seed, epoch) gets an order of its own."""
    if rule == "seed+epoch":
        return seed + epoch
    return int.from_bytes(hashlib.sha256(f"{seed}:{epoch}".encode()).digest()[:8], "little") >> 1


def _first_trained(labels: list[int]) -> int:
    """The index of the first trained token (len(labels) when none is)."""
    return next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), len(labels))
