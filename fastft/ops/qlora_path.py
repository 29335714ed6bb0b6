"""The two ways to run the QLoRA (and QDoRA) base GEMM, and the measured choice between them per shape.

fused    fastft.kernels.nf4_gemm.nf4_lora_gemm: W decoded in registers inside the GEMM's tile loads; W never
         exists in memory as bf16.
dequant  W decoded whole into ONE scratch buffer shared by every layer (fastft.kernels.nf4_dequant), then the
         dense fused LoRA GEMM (fastft.kernels.lora_gemm.lora_gemm) over it. On an H100 (docs/gpu-results.md)
         the decode inside the MMA loop does not hide, and dequantize + dense GEMM was ~2× faster at M=8192.

Memory: the scratch holds one weight (the largest seen so far, per device and dtype) and is reused by the next
layer's forward and by every backward, which decodes W again; no layer keeps a bf16 copy. Peak memory of a QLoRA
model on the dequant path is therefore at most that of the same model's bf16 LoRA layers plus one scratch buffer
(tests/test_qlora_path.py checks it on the GPU). The buffer lives until `release_dequant_scratch()`. Opt-in,
FASTFT_QLORA_PREFETCH=1 (fastft.ops.qlora_prefetch): two buffers instead, the next layer's decode beside this GEMM.
Launches are stream-ordered: a layer's GEMM finishes reading the scratch before the next layer's decode writes
it, on one stream. Threads (a server answering requests with one QLoRA model) launch onto the same stream: a lock
spans each decode and the launches that read it (`on_dequantized`), so another thread's decode never lands in
between. A caller that runs QLoRA layers on several streams at once must force FASTFT_QLORA_PATH=fused.

Choice: `select(key, run)` times both paths once per key (bucketed M, N, K, R, dtype, direction) with the
autotuner's machinery (fastft.kernels.autotune: a path that fails to run is skipped) and caches the winner.
FASTFT_QLORA_PATH=fused|dequant forces one; `auto` (the default) measures. Untimed (the CPU interpreter,
FASTFT_AUTOTUNE=0) the first that runs, fused, is taken. Weights whose rows do not hold whole blocks can only
take the dequant path.
"""
from __future__ import annotations

import os
import threading
from typing import Callable, TypeVar

import torch

from fastft.kernels.autotune import Tuner
from fastft.kernels.host import bucket
from fastft.kernels.runtime import on_operand_device
from fastft.ops import qlora_prefetch
from fastft.ops.shared import nf4_fused_ok

PATHS = ("fused", "dequant")
ENV = "FASTFT_QLORA_PATH"

# One Tuner over the two paths: the first config is the untimed default.
TUNER = Tuner("qlora_path", [{"path": p} for p in PATHS])

_SCRATCH: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}
_SCRATCH_LOCK = threading.RLock()
T = TypeVar("T")


def forced_path() -> str | None:
    """The path FASTFT_QLORA_PATH forces, or None for `auto`."""
    value = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if value == "auto":
        return None
    if value not in PATHS:
        raise ValueError(f"{ENV} must be one of fused, dequant or auto, got {value!r}")
    return value


def path_key(M: int, N: int, K: int, R: int, dtype: torch.dtype, direction: str) -> tuple:
    """The selector's key: token counts bucketed to powers of two, so a changing batch does not re-time."""
    return (bucket(M), N, K, R, dtype, direction)


def select(key: tuple, run: Callable[[str], torch.Tensor], *, fused_ok: bool = True) -> torch.Tensor:
    """run(path) for the path chosen for `key`: forced by FASTFT_QLORA_PATH, the only one that can run, or the
    measured winner (both timed the first time `key` is seen). Returns run's output."""
    forced = forced_path()
    if not fused_ok:
        return run("dequant")
    if forced is not None:
        return run(forced)
    result = {}

    def launch(config):
        result["out"] = run(config["path"])

    TUNER.run(key, launch)
    return result["out"]


@on_operand_device  # the choice times both paths: on the weight's GPU (a model spread over several)
def nf4_base_gemm(qweight, a, lo, t, bias, *, forward: bool, p_drop: float = 0.0, seed: int = 0,
                  leave_room: bool = False):
    """The QLoRA (and QDoRA) base GEMM on the selected path: forward y = a·Wᵀ + lo·tᵀ + b (t = B_p) or
    dx = a·W + keep∘(lo·t) (t = A_p), W the NF4Weight `qweight`; lo = t = None: no rank tail (nf4_linear).
    leave_room: rank reductions run beside it on another stream (fastft.ops.overlap): the dequant path's GEMM takes
    configs that leave them room (lora_gemm); the fused NF4 GEMM's own are not planned for it."""
    from fastft.kernels.lora_gemm import lora_gemm
    from fastft.kernels.nf4_gemm import nf4_lora_gemm

    N, K = qweight.shape
    out_cols, red = (N, K) if forward else (K, N)
    rank = 0 if lo is None else lo.shape[1]
    key = path_key(a.shape[0], out_cols, red, rank, a.dtype, "forward" if forward else "dx")

    def run(path):
        if path == "fused":
            return nf4_lora_gemm(a, qweight.kernel_operand(), lo, t, bias, w_nk=forward, p_drop=p_drop, seed=seed)
        # the scratch is overwritten by the next layer: used here and dropped
        return on_dequantized(qweight, a.dtype, lambda w: lora_gemm(a, w, lo, t, bias, b_nk=forward, p_drop=p_drop,
                                                                    seed=seed, leave_room=leave_room),
                              "forward" if forward else "dx")

    return select(key, run, fused_ok=nf4_fused_ok(qweight))


def chosen_path(key: tuple) -> str | None:
    """The cached winner for `key` (None before it was measured)."""
    config = TUNER.best.get(key)
    return None if config is None else config["path"]


def reset_path_choices() -> None:
    """Forget every measured choice (they are re-timed on next use)."""
    TUNER.best.clear()


def on_dequantized(qweight, dtype: torch.dtype, use: Callable[[torch.Tensor], T], order: str = "forward") -> T:
    """use(W) with qweight decoded into the shared scratch (dequant_scratch), W valid only inside `use`. The lock
    held from the decode through `use`'s launches keeps other threads' decodes out of that stretch of the stream.
    With FASTFT_QLORA_PREFETCH=1 (fastft.ops.qlora_prefetch) two buffers take the scratch's place and the next
    weight is decoded beside this call's GEMM (order: "forward" or "dx", the pass this call belongs to); not while a
    CUDA graph is being captured."""
    with _SCRATCH_LOCK:
        if qlora_prefetch.enabled() and qlora_prefetch.usable(qweight):
            return qlora_prefetch.prefetcher(qweight.device, dtype, decode_into).run(qweight, use, order)
        return use(dequant_scratch(qweight, dtype))


def dequant_scratch(qweight, dtype: torch.dtype) -> torch.Tensor:
    """qweight (a 2-D NF4Weight) decoded into the shared scratch buffer of its device and `dtype`, as an (N, K)
    view. Valid until the next call for the same device and dtype, from any thread: call it through
    `on_dequantized`, which holds the lock, and never keep W across layers."""
    numel = qweight.numel()
    slot = (qweight.device, dtype)
    buf = _SCRATCH.get(slot)
    if buf is None or buf.numel() < numel:
        _SCRATCH.pop(slot, None)  # drop the old buffer before allocating: peak stays one buffer
        del buf
        buf = torch.empty(numel, dtype=dtype, device=qweight.device)
        _SCRATCH[slot] = buf
    decode_into(qweight, buf[:numel])
    return buf[:numel].view(qweight.shape)


def decode_into(qweight, out: torch.Tensor, beside_gemm: bool = False) -> None:
    """qweight decoded into `out`, a contiguous flat tensor of its numel in the target dtype (beside_gemm: the decode
    runs beside a GEMM on another stream, nf4_dequantize's configs for that)."""
    from fastft.kernels.nf4_dequant import nf4_dequantize

    w = qweight.kernel_operand()
    nested = w.absmax2 is not None
    nf4_dequantize(w.packed, w.absmax, out.numel(), w.blocksize, out.dtype, w.code,
                   absmax2=w.absmax2 if nested else None, code2=w.code2 if nested else None,
                   offset=w.offset if nested else 0.0, nested_blocksize=w.nested_blocksize, out=out,
                   beside_gemm=beside_gemm)


def dequant_scratch_bytes() -> int:
    """Bytes held by the scratch buffers (all devices and dtypes; the prefetch buffers included)."""
    return sum(b.numel() * b.element_size() for b in _SCRATCH.values()) + qlora_prefetch.nbytes()


def release_dequant_scratch() -> None:
    """Free the scratch buffers (e.g. before evaluation or after training); the next QLoRA call reallocates."""
    with _SCRATCH_LOCK:
        _SCRATCH.clear()
        qlora_prefetch.release()
