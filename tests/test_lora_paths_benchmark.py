"""benchmarks/gpu_lora_paths.py runs end to end (FASTFT_BENCH_SMOKE=1: CPU, Triton interpreter, toy sizes).

The GPU run measures; this only catches script errors before GPU time is spent on them.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

from tests.utils import interpreter_only

ROOT = Path(__file__).resolve().parents[1]


@interpreter_only
def test_gpu_lora_paths_benchmark_smoke(tmp_path):
    env = dict(os.environ, FASTFT_BENCH_SMOKE="1", TRITON_INTERPRET="1", OUT=str(tmp_path))
    env.pop("FASTFT_LORA_PATH", None)
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_lora_paths.py")], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads((tmp_path / "lora_paths.json").read_text())
    assert result["correctness_failures"] == []
    timed = {(r["path"], r["part"]) for r in result["rows"] if r.get("ms") is not None}
    assert timed == {("frozen base", "fwd+bwd")} | {(p, part) for p in ("split", "fold")
                                                   for part in ("fwd", "bwd", "fwd+bwd")}
    assert all(e["path"] == "fold" and e["key"][0] in ("forward", "backward") for e in result["measured"])
    assert "## entries for fastft/ops/lora_path.py MEASURED" in run.stdout
    assert result["shapes_done"] == 1 and "MEASURED entries after 48->40 (1/1 shapes)" in run.stdout  # per shape


def test_measured_entries_need_a_margin_for_every_rank(monkeypatch):
    """The rule that turns timings into MEASURED entries (synthetic rows, not measurements)."""
    from fastft.ops.lora_path import path_key

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import gpu_lora_paths as bench

    def row(r, path, part, ms):
        return dict(shape="4096->4096", r=r, R=max(16, r), path=path, part=part, ms=ms)

    rows = [row(8, "split", "fwd", 1.0), row(8, "fold", "fwd", 0.9), row(16, "split", "fwd", 1.0),
            row(16, "fold", "fwd", 0.97),  # R=16 shared by r=8 and r=16: fold wins only by 3% at r=16 -> fold
            row(64, "split", "fwd", 1.0), row(64, "fold", "fwd", 0.99),  # within the margin -> split
            row(8, "split", "bwd", 1.0), row(8, "fold", "bwd", 0.5), row(16, "split", "bwd", 1.0),
            row(16, "fold", "bwd", 1.2)]  # r=16 loses -> no backward entry for R=16
    entries = bench.measured_entries(rows, correct=True)
    assert entries == {path_key("forward", bench.M, 4096, 4096, 16, bench.DTYPE): "fold"}
    assert bench.measured_entries(rows, correct=False) == {}


def test_timed_calls_leave_the_environment_alone(monkeypatch):
    """FASTFT_LORA_PATH is set around each measurement, not inside the timed calls: patching os.environ costs ~125 µs
    of host time a call, which was added to fastft's side only (the frozen base never patched it)."""
    import torch
    import torch.nn.functional as F

    from fastft.ops import lora_path

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    monkeypatch.delenv(lora_path.ENV, raising=False)
    import gpu_lora_paths as bench

    patched, timing, seen, inside = [], [False], [], []
    real_path, real_host_ms = bench.path, bench.host_ms

    def counted_path(name):
        patched.append(name)
        return real_path(name)

    def fake_lora_linear(x, W, b, A, B, scale, backend):
        if timing[0]:
            seen.append(lora_path.forced_path())
        return F.linear(x, W) + scale * (x @ A.T) @ B.T

    def timed(measure):
        def run(fn, *args, **kwargs):
            timing[0], before = True, len(patched)
            try:
                return measure(fn, *args, **kwargs)
            finally:
                timing[0] = False
                inside.append(len(patched) - before)
        return run

    monkeypatch.setattr(bench, "path", counted_path)
    monkeypatch.setattr(bench, "lora_linear", fake_lora_linear)
    monkeypatch.setattr(bench, "time_ms", timed(lambda fn, **kw: (fn(), fn(), 1.0)[-1]))
    monkeypatch.setattr(bench, "host_ms", timed(real_host_ms))
    for name, value in dict(SMOKE=True, DEVICE="cpu", DTYPE=torch.float32, M=8, RANKS=[8]).items():
        monkeypatch.setattr(bench, name, value)
    rows = bench.bench_shape(16, 24, rounds=2)
    assert len(rows) == 7 and inside and not any(inside), inside  # nothing patched while a measurement ran
    assert set(seen) == {"split", "fold"}  # yet each path's calls ran on their own path
    assert os.environ.get(lora_path.ENV) is None
