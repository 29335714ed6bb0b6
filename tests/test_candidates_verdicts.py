"""benchmarks/candidates.py: the verdict on each opt-in candidate from a GPU run's JSON (made up here)."""
import json

from tests.benchmark_smoke import ROOT


def _candidates(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import candidates
    return candidates


def _lora_rows(overlapped: list[float]):
    rows = []
    for shape, ov in zip(("4096->4096", "4096->14336"), overlapped):
        rows += [dict(shape=shape, r=16, method="fastft fused", ratio=1.10),
                 dict(shape=shape, r=16, method="fastft fused, overlapped dA/dB", ratio=ov)]
    return dict(rows=rows, correctness_failures=[], overlap_share=0.8)


def test_a_switch_is_promoted_only_when_correct_faster_somewhere_and_slower_nowhere(monkeypatch):
    c = _candidates(monkeypatch)
    assert c.overlap(_lora_rows([1.05, 1.095]))[0]["verdict"].startswith("promote")
    assert c.overlap(_lora_rows([1.05, 1.12]))[0]["verdict"].startswith("keep opt-in: slower")
    assert c.overlap(_lora_rows([1.095, 1.105]))[0]["verdict"] == "keep opt-in: within noise everywhere"
    failed = dict(_lora_rows([1.0, 1.0]), correctness_failures=["dx rel err"])
    assert "correctness" in c.overlap(failed)[0]["verdict"]
    failed = dict(_lora_rows([1.0, 1.0]), overlap_failures=["overlapped dA at (1037, 4096, 4096, 16): 3e-2 off"])
    assert "correctness" in c.overlap(failed)[0]["verdict"]
    raised = _lora_rows([1.0])
    raised["rows"].append(dict(shape="4096->14336", r=16, method="fastft fused, overlapped dA/dB", error="boom"))
    verdict = c.overlap(raised)[0]
    assert "correctness" in verdict["verdict"] and "boom" in verdict["measured"]
    fast_but_not_identical = dict(prefetch=[dict(shape="4096->14336", dequant_x_base=1.30, prefetch_x_base=1.20,
                                                 prefetch_identical=False)])
    assert "correctness" in c.prefetch(fast_but_not_identical)[0]["verdict"]
    good = dict(prefetch=[dict(shape="4096->14336", dequant_x_base=1.30, prefetch_x_base=1.20,
                               prefetch_identical=True)])
    assert c.prefetch(good)[0]["verdict"].startswith("promote")
    assert c.overlap(None) == [] and c.prefetch({}) == []


def test_a_split_k_gemv_joins_the_tuner_where_it_beats_the_pick_and_its_checks_passed(monkeypatch):
    c = _candidates(monkeypatch)
    gemv = [dict(shape="4096->14336", batch=1, fastft_us=27.0, table_deep_k4_us=27.1, table_deep_k2_us=21.0),
            dict(shape="4096->14336", batch=4, fastft_us=28.0, table_deep_k4_us=29.0, table_deep_k2_us=30.0),
            # above 8 rows the candidates launch TABLE's kernel: a "gain" there is noise, never a verdict
            dict(shape="4096->14336", batch=16, fastft_us=37.0, table_deep_k4_us=30.0, table_deep_k2_us=36.0)]
    checks = {"gemv table_deep_k4 4096->14336 batch 1 rel err": 2e-3,
              "gemv table_deep_k2 4096->14336 batch 1 rel err": 2e-3}
    got = {r["candidate"]: r["verdict"] for r in c.gemv_candidates(dict(gemv=gemv, correctness=checks))}
    assert got == {"GEMV TABLE_DEEP_K4": "leave out: never faster than the tuner's pick beyond noise",
                   "GEMV TABLE_DEEP_K2": "add to nf4_cuda.TUNER: faster at 4096->14336 b1"}
    checks["gemv table_deep_k2 4096->14336 batch 1 rel err"] = 0.4
    got = {r["candidate"]: r["verdict"] for r in c.gemv_candidates(dict(gemv=gemv, correctness=checks))}
    assert got["GEMV TABLE_DEEP_K2"].startswith("leave out: correctness failed")


def test_the_script_reads_a_results_folder(monkeypatch, tmp_path, capsys):
    c = _candidates(monkeypatch)
    (tmp_path / "lora.json").write_text(json.dumps(_lora_rows([1.05, 1.09])))
    rows = [dict(section="configs", shape="B4xS2048", kernel="backward", config="main", ms=2.0, candidate=False),
            dict(section="configs", shape="B4xS2048", kernel="backward", config="other", ms=2.1, candidate=False),
            dict(section="configs", shape="B4xS2048", kernel="backward", config="4-warp", ms=1.8, candidate=True),
            dict(section="configs", shape="B4xS2048", kernel="backward", config="broken", error="x", candidate=True),
            dict(section="configs", shape="B1xS8192", kernel="backward", config="main", ms=5.0, candidate=False),
            dict(section="configs", shape="B1xS8192", kernel="backward", config="4-warp", ms=4.99, candidate=True)]
    (tmp_path / "attention.json").write_text(json.dumps(dict(rows=rows)))
    assert c.main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| FASTFT_LORA_OVERLAP | promote" in out
    assert ("| attention backward B4xS2048 | add candidate 4-warp to the tuner's list: faster than its pick main "
            "| 2.000 ms; best candidate 4-warp 1.800 ms |") in out
    assert "| attention backward B1xS8192 | tuner's pick: main |" in out  # 0.2% faster: noise
    assert c.main([str(tmp_path / "missing")]) == 2
