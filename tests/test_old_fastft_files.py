"""Files an earlier fastft wrote, read by this one (audit: cross-version files). Fixtures in tests/data/old_fastft/:

- run_4eb4392_killed_at_4/: a `fastft train` folder of commit 4eb4392 (2026-11-30), stopped right after its step-4
  checkpoint (--data train24.jsonl --batch-size 4 --eval-examples 4 --save-every 2 --steps 8 --method lora
  --rank 2 --target-modules q_proj --max-length 24 --lr 1e-2 --warmup-ratio 0.25 --dtype fp32, on
  tests/train_utils.save_tiny_checkpoint). Checkpoints before 64f39b8 (2026-12-01) kept no settings or data digest
  and followed another warm-up + cosine schedule: resumed, the run switched schedules at its next step (lr
  0.00309 -> 0.00389) and took any other --lr, --alpha, --schedule or --data silently.
- study_cell_80e087a_nogit.json: a `fastft study` cell measured by commit 80e087a (2026-12-06) installed without
  .git, as `pip install fastft` leaves it: its provenance said git_commit None and fastft 0.1.0, as every commit's
  did, so this fastft read it back as its own (its test rows were the first --max-test ones, since changed to each
  class its share: macro-F1 0.448 there, 0.768 measured now).
"""
import json
import shutil
from pathlib import Path

import pytest

from fastft.apps import provenance

OLD = Path(__file__).parent / "data" / "old_fastft"
FLAGS = ["--batch-size", "4", "--eval-examples", "4", "--save-every", "2", "--steps", "8", "--method", "lora",
         "--rank", "2", "--target-modules", "q_proj", "--max-length", "24", "--lr", "1e-2", "--warmup-ratio", "0.25",
         "--dtype", "fp32"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tests.train_utils import save_tiny_checkpoint
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny"))


@pytest.mark.parametrize("changed", [[], ["--lr", "5e-2"]])
def test_a_checkpoint_from_before_settings_were_recorded_is_refused(tiny, tmp_path, capsys, changed):
    from fastft.apps.cli import main

    out = tmp_path / "run"
    shutil.copytree(OLD / "run_4eb4392_killed_at_4", out)
    def files():   # but the run's lock, which every run of a folder takes
        return sorted(p.relative_to(out) for p in out.rglob("*") if p.name != ".fastft-train.lock")

    before = files()
    argv = ["train", "--model", str(tiny), "--data", str(OLD / "train24.jsonl"), *FLAGS, *changed,
            "--output-dir", str(out), "--resume"]
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fastft train: error: --resume:") and "before 2026-12-01" in err and "\n" not in err
    assert files() == before   # nothing written, config.yaml kept
    assert "lr: 0.01" in (out / "config.yaml").read_text()


def test_a_study_cell_another_installed_fastft_measured_is_not_read_back(tmp_path, monkeypatch):
    from fastft.apps.study import runner
    from fastft.apps.study.cell import CellSettings

    monkeypatch.setattr(provenance, "code_state", lambda root: None)   # installed: no .git
    provenance.git_commit.cache_clear()
    try:
        now = runner.provenance(0)
    finally:
        provenance.git_commit.cache_clear()
    assert now["git_commit"].startswith("installed.")
    cell = json.loads((OLD / "study_cell_80e087a_nogit.json").read_text())
    assert cell["provenance"]["git_commit"] is None
    for name in ("device_name", "threads", "versions", "split_seed"):   # only the code differs
        cell["provenance"][name] = now[name]
    path = tmp_path / "cell.json"
    path.write_text(json.dumps(cell))
    assert runner._finished(path, CellSettings(**cell["settings"]), now) is None
    cell["provenance"] = now   # the same installed fastft's cell is read back
    path.write_text(json.dumps(cell))
    assert runner._finished(path, CellSettings(**cell["settings"]), now) is not None


def test_an_installed_package_digest_follows_its_files(tmp_path):
    package = tmp_path / "fastft"
    (package / "ops").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "ops" / "lora.py").write_text("x = 1\n")
    first = provenance.package_digest(package)
    (package / "__pycache__").mkdir()
    (package / "__pycache__" / "a.cpython-311.pyc").write_bytes(b"compiled")
    assert provenance.package_digest(package) == first   # compiled caches do not count
    (package / "ops" / "lora.py").write_text("x = 2\n")
    assert provenance.package_digest(package) != first
    (package / "ops" / "lora.py").write_text("x = 1\n")
    assert provenance.package_digest(package) == first
    (package / "ops" / "lora.py").rename(package / "ops" / "dora.py")   # a renamed file is other code
    assert provenance.package_digest(package) != first
