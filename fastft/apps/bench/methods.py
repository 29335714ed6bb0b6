"""`fastft bench methods`: every (method, implementation) run of one table, with a progress bar.

fastft and peft runs go method by method; the peers that patch transformers for the whole process (Liger,
Unsloth) run after them so they cannot leak into other rows.
"""
from __future__ import annotations

import sys
import time

import torch
from tqdm.auto import tqdm

from fastft.apps.bench import peers
from fastft.apps.bench.config import BenchConfig
from fastft.apps.bench.harness import environment, fmt_gib
from fastft.apps.bench.run import run_one
from fastft.apps.bench.shapes import DTYPES, resolve_dtype


RUN_AGAIN = ("planned", "error", "oom")  # statuses a resume measures again


def planned_runs(cfg: BenchConfig) -> list[tuple[str, str]]:
    """(method, implementation) pairs in run order: fastft and peft per method, then Liger, then Unsloth."""
    runs = []
    for group in (("fastft", "peft"), ("liger",), ("unsloth",)):
        for method in cfg.methods:
            runs += [(method, impl) for impl in group if impl == "fastft" or impl in cfg.peers]
    return runs


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def table_config(cfg: BenchConfig, device: torch.device) -> dict:
    """The settings a results file records (the flags, the device and the dtype that 'auto' became)."""
    dtype = resolve_dtype(cfg.dtype, device)
    return vars(cfg) | {"device": str(device), "dtype_resolved": next(k for k, v in DTYPES.items() if v == dtype)}


def row_key(row: dict) -> tuple[str, str, str]:
    """What identifies a run in a table: (method, implementation, compile mode)."""
    return row["method"], row["peer"], row.get("compile", "off")


def planned_row(method: str, implementation: str, mode: str) -> dict:
    return {"method": method, "implementation": peers.label(implementation, method), "peer": implementation,
            "compile": mode, "status": "planned"}


def bench_methods(cfg: BenchConfig, device: torch.device | None = None, progress: bool = True,
                  on_row=None, previous: dict | None = None) -> dict:
    """Run the table; returns {"environment", "config", "rows", "wall_s", "complete"} (what results.json holds).
    Every run starts as a "planned" row and `complete` is False until the last one is measured; `on_row(result
    so far)` is called after each run, and first when resuming (the CLI rewrites its files, so a run cut short
    leaves every finished row on disk, marked incomplete, and one killed before its first row leaves the files
    that were there). `previous`: a result of the same settings (resume.previous_result)
    whose measured rows are kept instead of measured again."""
    cfg.validate()
    device = torch.device(device or default_device())
    start = time.perf_counter()
    env = environment()
    env["device"] = str(device)
    peers.preload()
    modes = ("off",) if cfg.compile == "off" else ("off", cfg.compile)  # eager, then compiled: side by side
    runs = [(method, implementation, mode) for method, implementation in planned_runs(cfg) for mode in modes]
    # kept from the resumed table: measured rows; a crash or an OOM (a transient failure, or memory another row
    # left fragmented) is run again, as the study retries its failed cells
    done = {row_key(r): r for r in (previous or {}).get("rows", ()) if r.get("status") not in RUN_AGAIN}
    rows = [done.get((m, i, mode)) or planned_row(m, i, mode) for m, i, mode in runs]
    earlier_s = (previous or {}).get("wall_s", 0.0) if done else 0.0
    result = {"environment": env, "config": table_config(cfg, device), "rows": rows, "wall_s": earlier_s,
              "complete": False}
    if on_row is not None and done:  # a fresh table is first written with its first row: until then the files
        on_row(result)                 # there (a finished table of these settings, measured again) stay whole
    todo = [k for k, row in enumerate(rows) if row["status"] == "planned"]
    if done:
        print(f"fastft bench: resuming: {len(rows) - len(todo)} of {len(rows)} runs already measured",
              file=sys.stderr)
    bar = tqdm(todo, desc="fastft bench", unit="run", disable=not progress, dynamic_ncols=True)
    for k in bar:
        method, implementation, mode = runs[k]
        name = peers.label(implementation, method) + ("" if mode == "off" else f" compiled ({mode})")
        bar.set_postfix_str(f"{method} / {name}")
        row = rows[k] = run_one(cfg, method, implementation, device, compile=mode)
        if row["status"] == "ok":
            bar.write(f"{method:8s} {name:16s} {row['tokens_per_s']:>12,.0f} tokens/s "
                      f"{row['step_ms']:9.1f} ms/step  peak {fmt_gib(row['peak_gib'])} GiB")
        else:
            bar.write(f"{method:8s} {name:16s} {row['status']}: {row.get('reason') or row.get('error')}")
        result["wall_s"] = earlier_s + time.perf_counter() - start
        if on_row is not None:
            on_row(result)
    result["wall_s"] = earlier_s + time.perf_counter() - start
    result["complete"] = True
    return result
