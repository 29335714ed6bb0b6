"""benchmarks/gpu_nf4.py runs end to end in smoke mode (tests/benchmark_smoke.py): every section but the CUDA GEMV,
bitsandbytes as the peer on the CPU."""
from tests.benchmark_smoke import run_benchmark_smoke
from tests.utils import interpreter_only


@interpreter_only
def test_gpu_nf4_benchmark_smoke(tmp_path):
    result, stdout = run_benchmark_smoke("gpu_nf4.py", "nf4.json", tmp_path)
    assert result["errors"] == []
    checks = result["correctness"]
    assert [k for k, v in checks.items() if v is not True and not isinstance(v, list)] == []
    assert {"qlora fused within 1e-2 of fp32", "qlora dequant within 1e-2 of fp32"} <= checks.keys()
    assert [r["shape"] for r in result["dequant"]] == ["64x128", "96x64"]
    assert result["copy"][0]["TBps"] > 0 and all(r["fastft_of_copy"] > 0 for r in result["dequant"])
    assert [r["shape"] for r in result["qlora"]] == ["128->64"]  # the smoke run: one shape, one round
    for row in result["qlora"]:
        assert all(row[f"{k}_ms"] > 0 for k in ("bf16_base", "fused", "dequant", "auto", "dequant_base", "peft_bnb",
                                                 "dequant_host", "dequant_bf16_adapters"))
        assert 0 < row["bf16_base_ms"] <= row["bf16_base_first_ms"]  # timed again, interleaved: the best kept
    assert len(result["gemv"]) == 4 and all(r["bf16_us"] > 0 for r in result["gemv"])
    assert [r["shape"] for r in result["prefetch"]] == ["128->64"]
    assert all(r["prefetch_identical"] is True and r["prefetch_ms"] > 0 and r["dequant_ms"] > 0
               for r in result["prefetch"])
    assert "correctness: all checks passed" in stdout


def test_verdict_fails_on_crashed_checks_and_gemv_errors(monkeypatch, capsys):
    """A check that raised (None) and a GEMV off fp32 (its entry is a relative error) are failures and the script
    exits 1; before, only entries that were False counted and main() always exited 0. The results are saved after
    every part (GEMV before QLoRA), not only at the end."""
    from tests.benchmark_smoke import ROOT

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import gpu_nf4

    checks = {"dequant 4096x4096 exact vs torch": True, "qlora fused within 1e-2 of fp32": None,
              "qlora fused rel err y / dx / dA / dB (bf16, vs fp32)": [3e-3, 4e-3, 5e-3, 5e-3],
              "gemv scaled batch 1 rel err": 3e-3, "gemv table batch 1 rel err": 0.48,
              "gemv table batch 4 rel err": float("nan")}
    saved, row = [], {"shape": "4096x4096", "fastft_ms": 0.02, "fastft_TBps": 2.0}
    monkeypatch.setattr(gpu_nf4, "RESULTS", {"errors": []})
    for name, value in dict(SMOKE=True, DEV="cpu", check_correctness=lambda: checks,
                            time_copy=lambda rows: None, time_dequant=lambda rows: rows.append(row),
                            time_gemv=lambda rows: None, time_qlora=lambda rows: 1 / 0,
                            time_prefetch=lambda rows: None,
                            write_results=lambda name, payload: saved.append(dict(payload))).items():
        monkeypatch.setattr(gpu_nf4, name, value)
    assert gpu_nf4.main() == 1
    # saved after each part, GEMV before QLoRA: a run cut short keeps the parts it finished
    assert [key for key in saved[-1] if key in ("copy", "dequant", "gemv", "qlora")] == ["copy", "dequant", "gemv",
                                                                                        "qlora"]
    assert any(s.get("dequant") == [row] and "gemv" not in s for s in saved)
    verdict = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("correctness:"))
    assert "FAILED" in verdict and "qlora fused within 1e-2 of fp32: raised" in verdict
    assert "gemv table batch 1 rel err" in verdict and "gemv table batch 4 rel err" in verdict
    assert "gemv scaled" not in verdict and "qlora part crashed" in verdict
    assert gpu_nf4.failed_checks({"dequant exact": True, "gemv scaled batch 1 rel err": 3e-3}) == []
    assert gpu_nf4.failed_checks(None) == ["correctness did not run"]


def test_hbm_spec_names_each_card_by_its_own_entry():
    """"NVIDIA GH200 480GB" contains "H200": it read the H200's 4.8 TB/s, not its own 4.0 (the ÷ HBM column ~17%
    low)."""
    from fastft.apps.bench.harness import hbm_spec_tbps

    cards = {"NVIDIA H200": 4.8, "NVIDIA GH200 480GB": 4.0, "NVIDIA GH200 144G HBM3e": 4.9,
             "NVIDIA H100 80GB HBM3": 3.35, "NVIDIA H100 PCIe": 2.0, "NVIDIA H100 NVL": 3.9, "NVIDIA A100-SXM4-80GB": 2.04, "NVIDIA L4": None}
    assert {card: hbm_spec_tbps(card) for card in cards} == cards


def test_the_graph_table_sets_each_dequant_beside_a_copy_of_its_bytes(monkeypatch, capsys):
    """At 4096x4096 a dequant moves ~40 MB, too little to reach a 1 GiB copy's rate: the CUDA-graph table also gives
    a copy moving the same bytes and the selected config's share of its rate (the same-bytes copy row is not a
    config)."""
    from tests.benchmark_smoke import ROOT

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import gpu_nf4

    row = {"shape": "4096x4096", "fastft_ms": 0.03, "fastft_TBps": 1.4, "graph_selected_ms": 0.020,
           "graph_selected_of_copy": 0.70, "graph_same_bytes_copy_ms": 0.017, "graph_selected_of_same_bytes_copy": 0.85}
    monkeypatch.setattr(gpu_nf4, "RESULTS", {"device": "NVIDIA H100 80GB HBM3", "dequant": [row], "errors": []})
    gpu_nf4.print_tables([])
    table = capsys.readouterr().out
    line = next(x for x in table.splitlines() if x.startswith("| 4096x4096 | selected"))
    assert line == "| 4096x4096 | selected: 0.020 (70%) | 0.017 | 85% |", line
