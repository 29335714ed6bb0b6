"""A `fastft bench` table keeps its JSON, the only record a resume reads, while it is unfinished whatever --formats
asks (a resume with `--formats md` deleted the table it had just read: killed again, every row measured before was
lost), and drops it once complete if --formats left it out. A resume on another CPU (its model is the card name now;
the CPU count is compared too) or of a file whose config is not a dict is refused in one line, with --fresh.
Fast: fake runs (no model is built)."""
import json

import pytest

from fastft.apps.bench import methods as methods_module
from fastft.apps.bench.harness import card_name
from tests.test_bench_review_fixes import _bench, _fake_run_one, _one_line_error


def _kill_after(monkeypatch, calls, n):
    monkeypatch.setattr(methods_module, "run_one", _fake_run_one(calls, kill_after=n))


def test_an_unfinished_table_resumed_with_formats_md_keeps_its_json(tmp_path, monkeypatch):
    calls = []
    _kill_after(monkeypatch, calls, 1)
    with pytest.raises(KeyboardInterrupt):
        _bench(tmp_path)
    _kill_after(monkeypatch, calls, 2)   # the resume, killed after its first row
    with pytest.raises(KeyboardInterrupt):
        _bench(tmp_path, "--formats", "md")
    table = json.loads((tmp_path / "bench_methods.json").read_text())
    assert [r["status"] for r in table["rows"]] == ["ok", "ok", "planned", "planned"]
    calls.clear()
    monkeypatch.setattr(methods_module, "run_one", _fake_run_one(calls))
    assert _bench(tmp_path, "--formats", "md") == 0
    assert calls == [("dora", "fastft"), ("dora", "peft")]   # both measured rows kept
    assert not (tmp_path / "bench_methods.json").exists()   # complete: only what --formats asked for
    assert "Incomplete" not in (tmp_path / "bench_methods.md").read_text()


def test_the_cpu_model_is_the_card_name_and_another_cpu_is_refused(tmp_path, monkeypatch, capsys):
    assert card_name().startswith("cpu (") or card_name() == "cpu"   # "cpu" alone only where no model is known
    calls = []
    _kill_after(monkeypatch, calls, 1)
    with pytest.raises(KeyboardInterrupt):
        _bench(tmp_path)
    path = tmp_path / "bench_methods.json"
    table = json.loads(path.read_text())
    assert table["environment"]["card"] == card_name()
    monkeypatch.setattr(methods_module, "run_one", _fake_run_one(calls))   # a resume let through measures on
    for change, named in (({"cpu_count": 64}, "cpu_count: 64 there"), ({"card": "cpu (Other CPU)"}, "card:")):
        path.write_text(json.dumps({**table, "environment": {**table["environment"], **change}}))
        capsys.readouterr()
        assert _bench(tmp_path) == 2
        err = _one_line_error(capsys)
        assert named in err and "--fresh" in err and calls == [("lora", "fastft")]


def test_a_results_file_whose_config_is_not_a_dict_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(methods_module, "run_one", _fake_run_one([]))
    (tmp_path / "bench_methods.json").write_text(json.dumps({"config": "x", "environment": {}}))
    assert _bench(tmp_path) == 2
    err = _one_line_error(capsys)
    assert "is not a fastft bench results file (its config is a str, not a dict)" in err and "--fresh" in err

