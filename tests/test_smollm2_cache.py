"""The built-in SmolLM2's converted checkpoint cache: a cache written by a transformers that converted the GGUF
tokenizer wrongly (before 5.6) is converted again and swapped in; a right one is used as it is."""
import json

import pytest

from fastft.apps import models


def _write_checkpoint(folder, transformers_version, marker):
    folder.mkdir(parents=True, exist_ok=True)
    config = {"model_type": "llama"}
    if transformers_version is not None:
        config["transformers_version"] = transformers_version
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "tokenizer.json").write_text(marker)


@pytest.fixture
def converter(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTFT_CACHE", str(tmp_path))
    calls = []

    def convert(into):
        calls.append(into)
        _write_checkpoint(into, "5.24.0", "fresh")

    monkeypatch.setattr(models, "_convert_smollm2", convert)
    return calls


@pytest.mark.parametrize("written_by", ["5.5.0", "5.0.0.dev0", None, "not a version"])
def test_a_cache_written_wrongly_is_converted_again(converter, tmp_path, written_by):
    target = tmp_path / "models" / models.SMOLLM2
    _write_checkpoint(target, written_by, "stale")
    assert models.smollm2_checkpoint() == target
    assert len(converter) == 1
    assert (target / "tokenizer.json").read_text() == "fresh"
    assert sorted(p.name for p in target.parent.iterdir()) == [models.SMOLLM2]  # nothing left aside


@pytest.mark.parametrize("written_by", ["5.6.0", "5.24.0", "6.0.0"])
def test_a_right_cache_is_used_as_it_is(converter, tmp_path, written_by):
    target = tmp_path / "models" / models.SMOLLM2
    _write_checkpoint(target, written_by, "kept")
    assert models.smollm2_checkpoint() == target
    assert converter == []
    assert (target / "tokenizer.json").read_text() == "kept"


def test_the_first_use_converts(converter, tmp_path):
    target = models.smollm2_checkpoint()
    assert target == tmp_path / "models" / models.SMOLLM2 and len(converter) == 1
    assert (target / "tokenizer.json").read_text() == "fresh"
    assert sorted(p.name for p in target.parent.iterdir()) == [models.SMOLLM2]


def test_a_right_cache_another_process_finished_is_kept(converter, tmp_path):
    # two processes converting at once: the one finishing second leaves the first one's folder in place (the first
    # process may be reading it already), and drops its own
    target = tmp_path / "models" / models.SMOLLM2
    _write_checkpoint(target, "5.24.0", "first")
    second = tmp_path / "models" / ".second"
    _write_checkpoint(second, "5.24.0", "second")
    models._swap_in(second, target)
    assert (target / "tokenizer.json").read_text() == "first"


def test_the_tokenizer_alone_stands_in_for_the_checkpoint(tmp_path, monkeypatch):
    """The GPU machine gets SmolLM2's tokenizer saved alone (scripts/fetch-gpu-test-deps.sh), named by
    FASTFT_SMOLLM2_TOKENIZER: the tiny training checkpoints built from it tokenize as the converted checkpoint does,
    and the GGUF package is never needed."""
    from transformers import AutoTokenizer

    from tests.train_utils import save_tiny_checkpoint

    text = "Fine-tune the model: 42 steps, lr 2e-4.\nDone?"
    want = AutoTokenizer.from_pretrained(models.smollm2_checkpoint())
    want.save_pretrained(tmp_path / "alone")
    monkeypatch.setenv("FASTFT_SMOLLM2_TOKENIZER", str(tmp_path / "alone"))
    monkeypatch.setattr(models, "smollm2_checkpoint", lambda: pytest.fail("the checkpoint was asked for"))
    got = AutoTokenizer.from_pretrained(save_tiny_checkpoint(tmp_path / "tiny"))
    assert got(text)["input_ids"] == want(text)["input_ids"]
    assert len(got) == len(want) and got.eos_token == want.eos_token and got.chat_template == want.chat_template
