"""--data's records: without --eval-data the last tenth (at most --eval-examples) is held out and the description
counts the whole file; --eval-data is capped at --eval-examples; and a data file's fingerprint (size and sha256,
what a resumed run compares) covers every byte of a file longer than the 1 MiB blocks it is read in."""
import hashlib
import json

from fastft.apps.training.config import TrainConfig
from fastft.apps.training.records import file_fingerprint, load_records


def _jsonl(path, n, word="record"):
    path.write_text("".join(json.dumps({"text": f"{word} {i}"}) + "\n" for i in range(n)))
    return str(path)


def test_the_last_tenth_is_held_out_and_the_description_counts_the_file(tmp_path):
    cfg = TrainConfig(data=_jsonl(tmp_path / "d.jsonl", 40))
    train, evaluation, description = load_records(cfg)
    assert [r["text"] for r in evaluation] == [f"record {i}" for i in range(36, 40)]
    assert len(train) == 36 and train[-1]["text"] == "record 35"
    assert description.endswith("(40 records)")


def test_eval_data_is_capped_at_eval_examples(tmp_path):
    cfg = TrainConfig(data=_jsonl(tmp_path / "d.jsonl", 20), eval_data=_jsonl(tmp_path / "e.jsonl", 10, "held"),
                      eval_examples=3)
    train, evaluation, description = load_records(cfg)
    assert len(train) == 20 and [r["text"] for r in evaluation] == ["held 0", "held 1", "held 2"]
    assert description.endswith("(20 records)")


def test_fingerprint_covers_a_file_of_several_blocks(tmp_path):
    data = bytes(range(256)) * (10 * 1024 + 7)   # 2.5 MiB and a bit: three 1 MiB reads
    path = tmp_path / "big.jsonl"
    path.write_bytes(data)
    assert file_fingerprint(path) == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
