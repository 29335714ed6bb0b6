"""`fastft bench methods`: every (method, implementation) run of one table, with a progress bar.

fastft and peft runs go method by method; the peers that patch transformers for the whole process (Liger,
Unsloth) run after them so they cannot leak into other rows.
"""
from __future__ import annotations

import time

import torch
from tqdm.auto import tqdm

from fastft.apps.bench import peers
from fastft.apps.bench.config import BenchConfig
from fastft.apps.bench.harness import environment
from fastft.apps.bench.run import run_one
from fastft.apps.bench.shapes import DTYPES, resolve_dtype


def planned_runs(cfg: BenchConfig) -> list[tuple[str, str]]:
    """(method, implementation) pairs in run order: fastft and peft per method, then Liger, then Unsloth."""
    runs = []
    for group in (("fastft", "peft"), ("liger",), ("unsloth",)):
        for method in cfg.methods:
            runs += [(method, impl) for impl in group if impl == "fastft" or impl in cfg.peers]
    return runs


def bench_methods(cfg: BenchConfig, device: torch.device | None = None, progress: bool = True,
                  on_row=None) -> dict:
    """Run the table; returns {"environment", "config", "rows", "wall_s"} (what results.json holds).
    `on_row(result so far)` is called after each run (the CLI rewrites its files, so a run cut short by a
    time limit still leaves every finished row on disk)."""
    cfg.validate()
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    start = time.perf_counter()
    env = environment()
    env["device"] = str(device)
    dtype = resolve_dtype(cfg.dtype, device)
    config = vars(cfg) | {"device": str(device), "dtype_resolved": next(k for k, v in DTYPES.items() if v == dtype)}
    peers.preload()
    rows = []
    result = {"environment": env, "config": config, "rows": rows, "wall_s": 0.0}
    modes = ("off",) if cfg.compile == "off" else ("off", cfg.compile)  # eager, then compiled: side by side
    runs = [(method, implementation, mode) for method, implementation in planned_runs(cfg) for mode in modes]
    bar = tqdm(runs, desc="fastft bench", unit="run", disable=not progress, dynamic_ncols=True)
    for method, implementation, mode in bar:
        name = peers.label(implementation, method) + ("" if mode == "off" else f" compiled ({mode})")
        bar.set_postfix_str(f"{method} / {name}")
        row = run_one(cfg, method, implementation, device, compile=mode)
        rows.append(row)
        if row["status"] == "ok":
            bar.write(f"{method:8s} {name:16s} {row['tokens_per_s']:>12,.0f} tokens/s "
                      f"{row['step_ms']:9.1f} ms/step  peak {row['peak_gib']:.2f} GiB")
        else:
            bar.write(f"{method:8s} {name:16s} {row['status']}: {row.get('reason') or row.get('error')}")
        result["wall_s"] = time.perf_counter() - start
        if on_row is not None:
            on_row(result)
    result["wall_s"] = time.perf_counter() - start
    return result
