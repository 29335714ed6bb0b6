"""`fastft bench kernels`: the kernel micro-benchmarks (benchmarks/gpu_<family>.py of a source checkout), each
in its own process (a fresh CUDA context; the attention benchmark narrows the kernels' config lists for its
run), all on the shared harness (fastft.apps.bench.harness), results as <output-dir>/<family>.json.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

FAMILIES = ("lora", "nf4", "attention")
CPU_MESSAGE = ("fastft bench: error: kernel timings need a CUDA GPU and none is visible; nothing was timed (the "
               "method table, `fastft bench methods --shape tiny`, runs on the CPU)")


def benchmarks_dir() -> Path:
    return Path(__file__).resolve().parents[3] / "benchmarks"


def run_kernels(families: list[str], output_dir: str) -> int:
    """Run each family's benchmark; returns 0 when all passed (or there is no GPU: nothing to time)."""
    bad = [f for f in families if f not in FAMILIES]
    if bad:
        raise ValueError(f"--family: unknown family {', '.join(map(repr, bad))}; expected one of "
                         f"{', '.join(FAMILIES)} or all")
    if not torch.cuda.is_available():  # an error, not 0: a script would read "nothing timed" as a success
        print(CPU_MESSAGE, file=sys.stderr)
        return 2
    folder = benchmarks_dir()
    missing = [f for f in families if not (folder / f"gpu_{f}.py").is_file()]
    if missing:
        raise FileNotFoundError(f"fastft bench kernels: {folder} lacks gpu_{missing[0]}.py; the kernel benchmarks "
                                "live in a source checkout of fastft (benchmarks/), not in the installed package")
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    root = folder.parent
    env = dict(os.environ, OUT=str(Path(output_dir).resolve()),
               PYTHONPATH=os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])))
    status = 0
    for family in families:
        print(f"== fastft bench kernels: {family}", flush=True)
        rc = subprocess.call([sys.executable, str(folder / f"gpu_{family}.py")], env=env, cwd=root)
        if rc != 0:
            print(f"== {family}: exit {rc}", flush=True)
            status = 1
    return status
