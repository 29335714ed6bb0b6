"""Benchmark harness helpers: timing, peak memory, results files and tables.

Timings are medians of `triton.testing.do_bench` (CUDA events, warm-up excluded); memory is the peak
allocated during one call above what was allocated before it.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch


def card_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def time_ms(fn, warmup: int = 25, rep: int = 100) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


def peak_memory_mib(fn) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    def fmt(v):
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_results(name: str, payload: dict) -> Path | None:
    """Write payload as JSON to $OUT/<name>.json when $OUT is set (the GPU machine's result folder)."""
    out = os.environ.get("OUT")
    if not out:
        return None
    path = Path(out) / f"{name}.json"
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str))
    os.replace(tmp, path)
    return path
