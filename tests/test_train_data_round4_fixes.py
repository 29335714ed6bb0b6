"""Training data (audit round 4): a chat cut by --max-length kept no BOS (every other kind of document keeps the
tokenizer's leading tokens); a dpo pair whose answers differ as text but encode to the same tokens (an end of
sequence written at the end of one; message fields the template does not render) trained a constant log 2 with no
gradient; a ShareGPT record without a gpt turn was refused naming 'messages', a field its file does not have."""
import json

import pytest

from fastft.apps.training.config import ConfigError
from fastft.apps.training.data import Encoder, check_tokenizer
from fastft.apps.training.records import DataError, read_jsonl

IGNORE = -100


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from fastft.apps.models import smollm2_checkpoint
    return AutoTokenizer.from_pretrained(smollm2_checkpoint())


def _jsonl(path, *records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_a_cut_chat_keeps_its_bos_as_every_other_document_does():
    from transformers import AutoTokenizer

    from fastft.apps.models import smollm2_checkpoint

    adds_bos = AutoTokenizer.from_pretrained(smollm2_checkpoint(), add_bos_token=True)
    adds_bos.chat_template = "{{ bos_token }}" + adds_bos.chat_template  # Llama-style: the template renders it
    messages = [{"role": "user", "content": "word " * 40}, {"role": "assistant", "content": "Paris."}]
    whole = Encoder(adds_bos, 512).encode({"messages": messages})
    bos = adds_bos.bos_token_id
    assert whole.input_ids[0] == bos
    cut = Encoder(adds_bos, 24).encode({"messages": messages})
    assert len(cut.input_ids) == 24 and cut.input_ids[0] == bos and cut.labels[0] == IGNORE
    trained = [t for t in whole.labels if t != IGNORE]
    assert [t for t in cut.labels if t != IGNORE] == trained  # the answer whole
    assert cut.input_ids[1:] == whole.input_ids[len(whole.input_ids) - 23:]


@pytest.mark.parametrize("record", [
    {"prompt": "Is the sky blue?", "chosen": " Yes.", "rejected": " Yes.<|im_end|>"},
    {"prompt": [{"role": "user", "content": "Is the sky blue?"}],
     "chosen": [{"role": "assistant", "content": "Yes.", "score": 9}],
     "rejected": [{"role": "assistant", "content": "Yes.", "score": 2}]},
], ids=["text", "conversational"])
def test_a_pair_whose_answers_encode_alike_is_refused_before_training(tmp_path, tokenizer, record):
    other = {"prompt": "Is the sky blue?", "chosen": " Yes.", "rejected": " No."}
    records = read_jsonl(_jsonl(tmp_path / "pairs.jsonl", other, record), "dpo")  # different as read
    with pytest.raises(ConfigError, match=r"pairs.jsonl:2: 'chosen' and 'rejected' are the same tokens"):
        check_tokenizer(tokenizer, records, "dpo")
    check_tokenizer(tokenizer, records[:1], "dpo")  # a real preference passes


def test_sharegpt_and_alpaca_records_without_an_answer_are_named_in_their_own_fields(tmp_path):
    path = _jsonl(tmp_path / "sharegpt.jsonl", {"conversations": [{"from": "human", "value": "Hi"}]})
    with pytest.raises(DataError, match=r"sharegpt.jsonl:1: 'conversations' has no gpt \(assistant\) turn"):
        read_jsonl(path, "sft")
    path = _jsonl(tmp_path / "empty.jsonl", {"conversations": [{"from": "human", "value": "Hi"},
                                                               {"from": "gpt", "value": "  "}]})
    with pytest.raises(DataError, match=r"every gpt \(assistant\) turn of 'conversations' is empty"):
        read_jsonl(path, "sft")
    path = _jsonl(tmp_path / "alpaca.jsonl", {"instruction": "Say hi", "output": ""})
    with pytest.raises(DataError, match=r"alpaca.jsonl:1: an Alpaca record's 'output' is empty"):
        read_jsonl(path, "sft")
