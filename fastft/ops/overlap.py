"""A second CUDA stream for the LoRA / QLoRA / DoRA backward's rank reductions (dA, dB; DoRA's magnitude gradient
too), overlapped with its dx GEMM.

The reductions (fastft.kernels.rank_ops.rank_reduce_pair: gᵀ·x and dyᵀ·xs) read x, dy, g and xs and are
memory-bound; the dx GEMM (dy·W + g·A) is compute-bound and needs neither of their results. On one stream they run
one after the other: on the H100 (docs/gpu-results.md, 2026-12-05) the reductions cost ~0.13 ms of the 2.96 ms
fwd+bwd at 4096->14336, M = 8192, r = 16, more than the gap to the 1.06× target. With overlap on, the side stream
first waits for the current stream (g is ready), the dx GEMM is launched on the current stream, then the reductions
on the side stream, and the current stream waits for the side stream: nothing later on the current stream sees dA
or dB early. The results are the default path's up to summation order (the configs below group the fp32 sums
otherwise), the same bits run to run.

Two kernels overlap only where their blocks share the SMs. The GEMM is persistent (one block an SM) and its fastest
descriptor configs on sm_90 take 225–229 KB of an SM's 228 KB of shared memory: beside them no reduction block fits
(the tuned ones take 35–98 KB), so the two would still run one after the other, block by block. With overlap on,
the dx GEMM takes configs that leave room (fastft.kernels.lora_gemm: ≤ ~213 KB, ≤ 208 registers a thread) and the
reductions one small config (rank_ops.BESIDE_GEMM: ≤ 16 KB, ≤ 128 registers at R ≤ 64); the GEMM goes first, so
its blocks are placed before the reductions' fill the room left. tests/sm90_compile.py `overlap` checks that every
pair fits an sm_90 SM (shared memory, registers, threads). Ranks above MAX_RANK (the padded R) do not overlap.

A candidate until a GPU run shows the gain (benchmarks/gpu_lora.py's "overlapped" rows): off by default, on with
FASTFT_LORA_OVERLAP=1 (read at import) or `set_enabled(True)`. Never on the CPU, nor while a CUDA graph is being
captured (the side stream's allocations would need the graph's pool).
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterable, Optional

import torch

ENV = "FASTFT_LORA_OVERLAP"
MAX_RANK = 64  # rank_ops.BESIDE_GEMM is checked beside the GEMM up to this padded rank
_enabled = os.environ.get(ENV, "0").strip() == "1"
_SIDE: dict[torch.device, "torch.cuda.Stream"] = {}


def enabled() -> bool:
    return _enabled


def set_enabled(on: bool) -> None:
    """Turn the overlap on or off for later calls (the benchmark times both in one process)."""
    global _enabled
    _enabled = bool(on)


def _current(device: torch.device):
    return torch.cuda.current_stream(device)


def _side(device: torch.device):
    if device not in _SIDE:
        _SIDE[device] = torch.cuda.Stream(device)
    return _SIDE[device]


def _usable(device: torch.device) -> bool:
    return device.type == "cuda" and not torch.cuda.is_current_stream_capturing()


def _use(stream):
    return torch.cuda.stream(stream)


def _record(t: torch.Tensor, stream) -> None:
    t.record_stream(stream)


def fork(device: torch.device, rank: int):
    """The side stream, now waiting for the current stream's work so far (not for what is launched on it later), or
    None where the overlap is off or the padded `rank` is above MAX_RANK (then `on(None)` and `join(None, ...)` do
    nothing)."""
    if not _enabled or rank > MAX_RANK or not _usable(device):
        return None
    side = _side(device)
    side.wait_stream(_current(device))
    return side


@contextlib.contextmanager
def on(side):
    """Launches inside go to `side` (the current stream when side is None)."""
    if side is None:
        yield
    else:
        with _use(side):
            yield


def join(side, read: Iterable[Optional[torch.Tensor]], made: Iterable[Optional[torch.Tensor]]) -> None:
    """The current stream waits for `side`. `read`: tensors of the current stream the side stream read (their memory
    is not reused before the side stream is done with it); `made`: tensors the side stream allocated that the current
    stream now uses (nor theirs before the current stream is)."""
    if side is None:
        return
    current = _current(side.device)
    for t in read:
        if t is not None:
            _record(t, side)
    for t in made:
        if t is not None:
            _record(t, current)
    current.wait_stream(side)
