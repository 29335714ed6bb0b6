"""benchmarks/host_overhead.py: the stub really skips launches and is undone after, and the script runs."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def test_launches_stubbed_skips_kernels_and_restores_them(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import host_overhead
    from fastft.kernels.rank_ops import _dropout_mask_kernel

    def launch(out):
        _dropout_mask_kernel[(2, 2)](out, 40, 40, 0.0, 1, BLOCK_M=32, BLOCK_K=32)
        return out

    with host_overhead.launches_stubbed():
        assert (launch(torch.full((40, 40), 7, dtype=torch.int8)) == 7).all()  # nothing written
    assert (launch(torch.full((40, 40), 7, dtype=torch.int8)) == 1).all()  # p_drop 0 keeps all: the kernel ran

def test_script_reports_every_op(monkeypatch, tmp_path, capsys):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    monkeypatch.setenv("OUT", str(tmp_path))
    import host_overhead

    threads = torch.get_num_threads()
    env = {key: os.environ.get(key) for key in ("FASTFT_AUTOTUNE", "FASTFT_LORA_BACKEND")}
    assert host_overhead.main(["--calls", "2", "--rounds", "1"]) == 0
    # the benchmark's process settings do not leak into the tests that follow in this process
    assert torch.get_num_threads() == threads
    assert {key: os.environ.get(key) for key in env} == env
    assert torch.tensor(1e-40) * 1.0 != 0  # denormals no longer flushed
    from fastft.integration import attention
    assert attention._backend == "auto"
    rows = json.loads((tmp_path / "host_overhead.json").read_text())
    assert [row["op"] for row in rows] == list(host_overhead.CASES)
    assert all(row["fastft_us"] > 0 and (row.get("floor_us") or row["peft_us"]) > 0 for row in rows)
    assert "lora" in capsys.readouterr().out


@pytest.mark.parametrize("flag", ["--calls", "--rounds"])
def test_counts_below_one_are_refused(monkeypatch, capsys, flag):
    """--calls 0 divided by zero, --calls -3 gave negative µs and --rounds 0 wrote Infinity into the JSON."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import host_overhead

    with pytest.raises(SystemExit):
        host_overhead.main([flag, "0"])
    assert f"{flag} must be at least 1, got 0" in capsys.readouterr().err
