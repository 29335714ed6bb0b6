"""The CUDA decode GEMV over an NF4 weight (csrc/cuda/nf4_gemv.cu), from the optional compiled extension.

y[b, n] = Σ_k x[b, k]·W[n, k] (+ bias[n]) for 1 ≤ batch ≤ 16 tokens, reading W once at 0.5 byte an element.
`supported(...)` says whether this launch can take the problem; callers fall back to the Triton GEMM.

Two kernels (csrc/cuda/nf4_gemv.cu): SCALED decodes code[nibble]·absmax per element in fp32, rounded once (the
dequantized weight bit for bit); TABLE (blocksize >= 64, in_features % 64 == 0) reads both unscaled codes of a
byte with one shared-memory lookup and scales each 64-column sum once, ~33% fewer instructions a W element.
`nf4_gemv` times them and TABLE_LEAN, TABLE_DEEP (below) once per shape and keeps the fastest
(fastft.kernels.autotune), after a once-per-device check that TABLE agrees with SCALED; untimed
(FASTFT_AUTOTUNE=0, CUDA-graph capture) it runs SCALED.

TABLE_LEAN and TABLE_DEEP, in the tuner's list since the H100 run of 2026-12-05 (docs/gpu-results.md: bit-identical to
TABLE in tests/test_nf4_gpu.py, and faster at batch 1: 4096->4096 11.9 vs 13.1 us, 4096->14336 25.1 vs 28.0 (lean),
14336->4096 22.7 vs 27.5 (deep)): TABLE's arithmetic, bit for bit, with a leaner loop (fewer instructions a W
byte, unpredicated loads) where in_features % 128 == 0 and batch <= 8; TABLE's
kernel runs elsewhere, and for the ragged last 16 rows. Accepted where TABLE is (`table_supported`). TABLE_DEEP keeps
three steps of each warp's loads in flight while one computes (TABLE and TABLE_LEAN: one), at 2 blocks an SM instead
of 3: on the H200 the GEMV reads 23% of HBM without being issue-bound, so too few bytes in flight is the suspect.

TABLE_DEEP_K4 and TABLE_DEEP_K2, candidates (forced only, never run on a GPU yet): TABLE_DEEP with a block's K split
over 4 or 2 warps (blocks of 32 or 64 rows), so each warp's ring runs 2 or 4 times as many steps and the byte table is
filled a half or a quarter as often; within TABLE's rounding, not bit-identical (the partial sums group otherwise).
ncu on the H100 (docs/gpu-results.md, 2026-12-05) found TABLE at 4096->14336 batch 1 neither memory- nor issue-bound:
896 blocks of 4 steps a warp, 2.26 waves.
"""
from __future__ import annotations

import warnings

import torch

from fastft.kernels.autotune import Tuner, capturing
from fastft.kernels.runtime import on_operand_device
from fastft.kernels.shared import bucket

try:
    from fastft import _C
except ImportError:  # the extension is optional
    _C = None

MAX_BATCH = 16
SCALED, TABLE, TABLE_LEAN, TABLE_DEEP = 0, 1, 2, 3
# candidates, forced only (not in TUNER's list until a GPU run backs them): TABLE_DEEP with K split over 4 or 2 warps
TABLE_DEEP_K4, TABLE_DEEP_K2 = 4, 5
_DTYPE_CODES = {torch.float16: 1, torch.bfloat16: 2}
# the first: the untimed default
TUNER = Tuner("nf4_gemv", [{"variant": v} for v in (SCALED, TABLE, TABLE_LEAN, TABLE_DEEP)])
_TABLE_AGREES: dict[tuple[torch.device, torch.dtype], bool] = {}


def available() -> bool:
    return _C is not None and hasattr(_C, "nf4_gemv_cuda")


def supported(x2: torch.Tensor, w) -> bool:
    """x2 [batch, K] and w a fastft.kernels.nf4_gemm.NF4Operand."""
    return (available() and x2.is_cuda and x2.dtype in _DTYPE_CODES and 1 <= x2.shape[0] <= MAX_BATCH
            and w.cols % 32 == 0 and w.blocksize >= 32 and w.packed.data_ptr() % 16 == 0 and runs_on(x2.device))


MIN_CAPABILITY = (8, 0)  # the kernels use bf16 mma.m16n8k16 (sm_80+); the extension is built for sm_80 and sm_90
_RUNS_ON: dict[torch.device, bool] = {}


def runs_on(device: torch.device) -> bool:
    """Once per device: the extension's kernels run there, or the Triton GEMM serves (an error at every QLoRA decode
    step otherwise): the GPU is sm_80+ and one small launch succeeds (a driver older than the CUDA runtime the
    extension was built with fails it). Not checked while a CUDA graph is captured (the launch would join it)."""
    if device not in _RUNS_ON:
        if capturing():
            return False
        runs = torch.cuda.get_device_capability(device) >= MIN_CAPABILITY
        if runs:
            from fastft.kernels.nf4_gemm import random_nf4_operand

            gen = torch.Generator(device="cpu").manual_seed(0)
            w = random_nf4_operand(16, 64, device, gen)
            x = torch.randn(1, w.cols, generator=gen).to(device=device, dtype=torch.float16)
            try:
                runs = bool(torch.isfinite(nf4_gemv(x, w, None, SCALED)).all())
            except RuntimeError as e:
                warnings.warn(f"fastft: the compiled NF4 decode GEMV does not run on {device} ({e}); QLoRA decoding "
                              "uses the Triton GEMM there", stacklevel=2)
                runs = False
        _RUNS_ON[device] = runs
    return _RUNS_ON[device]


def table_supported(w) -> bool:
    """The TABLE (and TABLE_LEAN, TABLE_DEEP) kernel needs every 64-column half-step inside one absmax block."""
    return w.blocksize >= 64 and w.cols % 64 == 0


@on_operand_device  # the variant choice times launches: on x2's GPU
def nf4_gemv(x2: torch.Tensor, w, bias: torch.Tensor | None, variant: int | None = None) -> torch.Tensor:
    """y [batch, w.rows] in x2's dtype; the caller checked `supported(x2, w)`. variant: SCALED, TABLE, TABLE_LEAN,
    TABLE_DEEP, TABLE_DEEP_K4 or TABLE_DEEP_K2 forces one (all but SCALED must be `table_supported`); None picks by
    measurement among the first four."""
    batch, k = x2.shape
    if x2.stride(1) != 1 or (batch > 1 and x2.stride(0) % 8) or x2.data_ptr() % 16:
        # 16-byte vector loads need aligned rows; x is small at decode time. A copy, not .contiguous(): that keeps a
        # contiguous view that starts off a 16-byte boundary (e.g. x[0, 1:] of a row)
        x2 = x2.clone(memory_format=torch.contiguous_format)
    # one row: its stride is never used, and may be anything (a [K, 1] column transposed has stride 1, and counts
    # as contiguous, so .contiguous() keeps it): give the kernel k, which its alignment check accepts
    ldx = x2.stride(0) if batch > 1 else k
    if bias is not None:
        bias = bias.to(x2.dtype).contiguous()
    y = torch.empty((batch, w.rows), dtype=x2.dtype, device=x2.device)
    nested = w.absmax2 is not None
    stream = torch.cuda.current_stream(x2.device).cuda_stream

    def launch(v: int) -> None:
        with torch.cuda.device(x2.device):
            _C.nf4_gemv_cuda(
                x2.data_ptr(), ldx, w.packed.data_ptr(), w.absmax.data_ptr(),
                w.absmax2.data_ptr() if nested else 0, w.code2.data_ptr() if nested else 0, float(w.offset),
                w.nested_blocksize, bias.data_ptr() if bias is not None else 0, y.data_ptr(), y.stride(0), batch,
                w.rows, k, w.blocksize, _DTYPE_CODES[x2.dtype], stream, v)

    # the check syncs: not while a CUDA graph is captured (SCALED is launched into the graph then)
    checked = (x2.device, x2.dtype) in _TABLE_AGREES or not capturing()
    if variant is None and table_supported(w) and checked and table_agrees(x2.device, x2.dtype):
        key = (bucket(batch), w.rows, k, w.blocksize, nested, x2.dtype)
        TUNER.run(key, lambda config: launch(config["variant"]))
    else:
        launch(SCALED if variant is None else variant)
    return y


def table_agrees(device: torch.device, dtype: torch.dtype) -> bool:
    """Once per device and dtype: the TABLE kernel's y is within 1% (relative norm) of the SCALED kernel's on a
    ragged double-quantized problem (rows not a multiple of 16, in_features with a last half-step of 64, 3 tokens).
    They round differently (codes vs products), by ~2⁻⁹ for bf16; a layout error would be off by O(1). A kernel
    that disagrees is never chosen."""
    key = (device, dtype)
    if key not in _TABLE_AGREES:
        from fastft.kernels.nf4_gemm import random_nf4_operand

        gen = torch.Generator(device="cpu").manual_seed(0)
        w = random_nf4_operand(88, 320, device, gen)
        x = torch.randn(3, w.cols, generator=gen).to(device=device, dtype=dtype)
        try:
            table = nf4_gemv(x, w, None, TABLE).float()
            scaled = nf4_gemv(x, w, None, SCALED).float()
            agrees = bool(torch.isfinite(table).all()) and float(
                (table - scaled).norm() / scaled.norm().clamp_min(1e-30)) <= 1e-2
        except RuntimeError:
            agrees = False
        _TABLE_AGREES[key] = agrees
    return _TABLE_AGREES[key]
