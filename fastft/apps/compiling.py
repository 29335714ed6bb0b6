"""torch.compile as an option of the apps (`fastft train --compile`, `fastft bench --compile`): the choices, and
the combinations refused before anything loads.

The mode is torch.compile's (default, reduce-overhead, max-autotune, max-autotune-no-cudagraphs); "off" runs
eagerly. reduce-overhead and max-autotune capture CUDA graphs, and a graph replays the host-drawn dropout seed of
fastft's fused LoRA ops unchanged (the same mask every step), so those ops refuse dropout > 0 under capture; the
apps refuse that combination up front.
"""
from __future__ import annotations

import os
import shutil

COMPILE_MODES = ("off", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")  # inductor captures CUDA graphs in these
COMPILE_BACKENDS = ("inductor", "aot_eager", "eager")
DROPOUT_METHODS = ("lora", "qlora", "dora")  # their fused ops draw the dropout seed on the host


def compile_problem(mode: str, backend: str, *, cuda: bool, dropout: float = 0.0, methods=(),
                    flags=("--compile", "--compile-backend")) -> str | None:
    """Why `mode` with `backend` cannot run here (one line naming the flags), or None when it can."""
    mode_flag, backend_flag = flags
    if mode not in COMPILE_MODES:
        return f"{mode_flag} must be one of {', '.join(COMPILE_MODES)}, got {mode!r}"
    if backend not in COMPILE_BACKENDS:
        return f"{backend_flag} must be one of {', '.join(COMPILE_BACKENDS)}, got {backend!r}"
    if mode == "off":
        return None
    if mode != "default" and backend != "inductor":
        return (f"{mode_flag} {mode} is a mode of the inductor backend; {backend_flag} {backend} has no modes (use "
                f"{mode_flag} default with it, or {backend_flag} inductor)")
    dropping = [m for m in methods if m in DROPOUT_METHODS]
    if mode in CUDA_GRAPH_MODES and dropout > 0 and dropping:
        return (f"{mode_flag} {mode} captures CUDA graphs, which would replay the fused LoRA ops' dropout seed "
                f"unchanged (the same mask every step): use --dropout 0 with --method {', '.join(dropping)} (got "
                f"--dropout {dropout:g}), or {mode_flag} default"
                + (" or max-autotune-no-cudagraphs" if mode == "max-autotune" else ""))
    if backend == "inductor" and not cuda:
        compiler = os.environ.get("CXX") or "g++"
        if shutil.which(compiler) is None:
            return (f"{backend_flag} inductor on the CPU generates C++ and needs a C++ compiler, and {compiler!r} is "
                    f"not on PATH (set CXX, install g++, or use {backend_flag} aot_eager)")
    return None


def compile_kwargs(mode: str, backend: str) -> dict:
    """torch.compile's keyword arguments for a mode other than "off" (the default mode is not passed)."""
    return {"backend": backend, **({} if mode == "default" else {"mode": mode})}


def dynamo_counts() -> dict[str, int]:
    """Process-wide dynamo counters: graphs compiled, graph breaks met, recompile limits hit (each hit leaves a
    frame running eagerly from then on). A run's own: the difference of two reads."""
    from torch._dynamo.utils import counters

    limit_hits = sum(n for reason, n in counters["unimplemented"].items() if _is_recompile_limit(reason))
    return {"graphs": counters["stats"]["unique_graphs"], "graph_breaks": sum(counters["graph_break"].values()),
            "recompile_limit_hits": limit_hits}


def _is_recompile_limit(reason: str) -> bool:
    text = reason.lower()   # "Dynamo recompile limit exceeded" (older torch: "cache_size_limit")
    return any(k in text for k in ("recompile limit", "recompile_limit", "cache_size_limit", "cache size limit"))
