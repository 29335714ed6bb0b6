"""Found by a mutation run over fastft/apps/training (tests that could not fail): logs.jsonl's lr read after the
optimizer step (the next step's rate) passed every test, and so did a text record of exactly --max-length tokens
counted as cut."""
import json

import pytest
from transformers import AutoTokenizer

from fastft.apps.cli import main
from fastft.apps.training.data import Encoder
from tests import train_utils

tiny, one_thread = train_utils.tiny, train_utils.one_thread  # the shared fixtures


@pytest.mark.slow
def test_each_logged_lr_is_the_rate_its_step_trained_with(tiny, one_thread, tmp_path):
    out = tmp_path / "run"
    assert main(["train", "--model", str(tiny), "--steps", "4", "--batch-size", "2", "--eval-examples", "2",
                 "--max-length", "24", "--lr", "1e-2", "--warmup-ratio", "0.5", "--schedule", "linear",
                 "--output-dir", str(out)]) == 0
    lines = [json.loads(line) for line in (out / "logs.jsonl").read_text().splitlines()]
    logged = [line["lr"] for line in lines if "lr" in line]
    # 2 warm-up steps to the peak (1/2, 2/2), then linear towards 0: (1 - 1/3), (1 - 2/3)
    assert logged == pytest.approx([5e-3, 1e-2, 1e-2 * 2 / 3, 1e-2 / 3], rel=1e-9)


def test_a_record_of_exactly_max_length_tokens_is_not_cut():
    tokenizer = AutoTokenizer.from_pretrained(str(train_utils.smollm2_tokenizer_path()))
    text = "one two three four five six seven eight nine ten"
    length = len(Encoder(tokenizer, 10_000).encode({"text": text}).input_ids)
    encoder = Encoder(tokenizer, length)
    assert len(encoder.encode({"text": text}).input_ids) == length and not encoder.last_cut
    encoder = Encoder(tokenizer, length - 1)
    assert len(encoder.encode({"text": text}).input_ids) == length - 1 and encoder.last_cut
