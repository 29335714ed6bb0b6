"""Triton helpers every kernel family shares: dropout masks, tile order, GEMM operand blocks through a descriptor
or pointers (row-major, or N- or K-major), accurate tanh / GeLU without libdevice, dot precision and the
interpreter's upcast rule, tuning buckets. One place, so no family imports another's private names."""
from __future__ import annotations

import torch

from fastft.kernels.host import bucket  # noqa: F401  (re-exported: the kernels' tuning keys)
from fastft.kernels.runtime import INTERPRET, cdiv, device_sms, triton

import triton.language as tl


@triton.jit
def dropout_keep(seed, rows, cols, n_cols, p):
    """Keep-mask of inverted dropout for element (row, col) of a matrix with n_cols columns (Philox)."""
    offsets = rows.to(tl.int64)[:, None] * n_cols + cols[None, :]
    return tl.rand(seed, offsets) >= p


@triton.jit
def wide_index(idx, WIDE: tl.constexpr):
    """idx as int64 when WIDE (idx × its stride may pass 2^31: runtime.wide_columns / wide_offsets), else as it is:
    int32 offsets keep the common launch's registers unchanged."""
    if WIDE:
        idx = idx.to(tl.int64)
    return idx


@triton.jit
def tile_coords(tile_id, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of a linear tile id in grouped order: GROUP_M row-tiles share their column tiles
    while those sit in L2."""
    group_size = GROUP_M * num_pid_n
    first_m = (tile_id // group_size) * GROUP_M
    rows_in_group = min(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (tile_id % group_size) % rows_in_group
    pid_n = (tile_id % group_size) // rows_in_group
    return pid_m, pid_n


@triton.jit
def kn_descriptor(ptr, K, N, stride_n, stride_k, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, N_MAJOR: tl.constexpr):
    """Tensor descriptor of a GEMM operand that is logically [K, N] and stored N-major ([N, K], row stride
    stride_n) or K-major ([K, N], row stride stride_k); read its [BLOCK_K, BLOCK_N] tiles with `load_kn`."""
    if N_MAJOR:
        return tl.make_tensor_descriptor(ptr, shape=[N, K], strides=[stride_n, 1], block_shape=[BLOCK_N, BLOCK_K])
    else:
        return tl.make_tensor_descriptor(ptr, shape=[K, N], strides=[stride_k, 1], block_shape=[BLOCK_K, BLOCK_N])


@triton.jit
def load_kn(desc, off_k, off_n, N_MAJOR: tl.constexpr):
    """The [BLOCK_K, BLOCK_N] tile at (off_k, off_n) of a `kn_descriptor` operand, whichever its storage."""
    if N_MAJOR:
        return desc.load([off_n, off_k]).T
    else:
        return desc.load([off_k, off_n])


@triton.jit
def block_source(ptr, n_rows, n_cols, stride_row, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr,
                 USE_TMA: tl.constexpr):
    """What `load_block` / `store_block` take for a row-major [n_rows, n_cols] GEMM operand: a tensor descriptor
    of [BLOCK_ROWS, BLOCK_COLS] boxes (USE_TMA: unit column stride, bounds come free) or the base pointer."""
    if USE_TMA:
        return tl.make_tensor_descriptor(ptr, shape=[n_rows, n_cols], strides=[stride_row, 1],
                                         block_shape=[BLOCK_ROWS, BLOCK_COLS])
    else:
        return ptr


@triton.jit
def load_block(src, off_row, off_col, n_rows, n_cols, stride_row, stride_col, BLOCK_ROWS: tl.constexpr,
               BLOCK_COLS: tl.constexpr, USE_TMA: tl.constexpr, CHECK_COLS: tl.constexpr = True):
    """The [BLOCK_ROWS, BLOCK_COLS] block at (off_row, off_col) of a `block_source` operand, zeros outside it.
    Pointer loads use both strides; CHECK_COLS=False: the columns are known to lie inside (a padded rank)."""
    if USE_TMA:
        return src.load([off_row, off_col])
    else:
        # int64 offsets: a row (or, transposed, a column) times its stride passes 2^31 at scale (M·N elements)
        rows = (off_row + tl.arange(0, BLOCK_ROWS)).to(tl.int64)
        cols = (off_col + tl.arange(0, BLOCK_COLS)).to(tl.int64)
        mask = rows[:, None] < n_rows
        if CHECK_COLS:
            mask = mask & (cols[None, :] < n_cols)
        return tl.load(src + rows[:, None] * stride_row + cols[None, :] * stride_col, mask=mask, other=0.0)


@triton.jit
def store_block(dst, off_row, off_col, n_rows, n_cols, stride_row, block, BLOCK_ROWS: tl.constexpr,
                BLOCK_COLS: tl.constexpr, USE_TMA: tl.constexpr):
    """Store a [BLOCK_ROWS, BLOCK_COLS] block at (off_row, off_col) of a `block_source` operand (unit column
    stride), clipped at its edges."""
    if USE_TMA:
        dst.store([off_row, off_col], block)
    else:
        rows = (off_row + tl.arange(0, BLOCK_ROWS)).to(tl.int64)  # int64 offsets, as load_block's
        cols = off_col + tl.arange(0, BLOCK_COLS)
        tl.store(dst + rows[:, None] * stride_row + cols[None, :], block,
                 mask=(rows[:, None] < n_rows) & (cols[None, :] < n_cols))


@triton.jit
def kn_source(ptr, K, N, stride_n, stride_k, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, N_MAJOR: tl.constexpr,
              USE_TMA: tl.constexpr):
    """`kn_descriptor` (USE_TMA) or the base pointer: what `load_kn_block` takes."""
    if USE_TMA:
        return kn_descriptor(ptr, K, N, stride_n, stride_k, BLOCK_K, BLOCK_N, N_MAJOR)
    else:
        return ptr


@triton.jit
def load_kn_block(src, off_k, off_n, K, N, stride_k, stride_n, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
                  N_MAJOR: tl.constexpr, USE_TMA: tl.constexpr, CHECK_K: tl.constexpr = True,
                  CHECK_N: tl.constexpr = True, WIDE: tl.constexpr = False):
    """The [BLOCK_K, BLOCK_N] block at (off_k, off_n) of a logically [K, N] `kn_source` operand, whichever its
    storage, zeros outside it. CHECK_K / CHECK_N=False: that dimension is known to lie inside (a padded rank).
    WIDE (runtime.wide_offsets of the operand): int64 pointer offsets, for a weight of 2^31 elements or more (n × K
    or k × N passes 2^31; Nemotron-4-340B's head is 4.7e9); int32 otherwise, which keeps the pointer GEMMs' registers
    as they were. A descriptor's address math is 64-bit either way."""
    if USE_TMA:
        return load_kn(src, off_k, off_n, N_MAJOR)
    else:
        ks = wide_index(off_k + tl.arange(0, BLOCK_K), WIDE)
        ns = wide_index(off_n + tl.arange(0, BLOCK_N), WIDE)
        if CHECK_K and CHECK_N:
            mask = (ks[:, None] < K) & (ns[None, :] < N)
        elif CHECK_K:
            mask = ks[:, None] < K
        else:
            mask = ns[None, :] < N
        return tl.load(src + ks[:, None] * stride_k + ns[None, :] * stride_n, mask=mask, other=0.0)


@triton.jit
def tanh(x):
    """tanh in fp32 without libdevice, accurate to a few ulp everywhere: 2σ(2x) − 1 cancels to an absolute error
    of ~1 ulp of 1, i.e. ~u32/|x| relative, as x → 0 (fuzz: the bottleneck adapter's tanh 1.15× over its bound).
    |x| < 0.5: tanh's odd Taylor polynomial to x¹⁵ (the next term is < 2⁻²⁶ relative there);
    above: (1 − e)/(1 + e), e = exp(−2|x|) ≤ e⁻¹, where 1 − e no longer cancels."""
    ax = tl.abs(x)
    e = tl.exp(-2.0 * ax)
    large = (1.0 - e) / (1.0 + e)
    x2 = x * x
    small = ax * (1.0 + x2 * (-0.3333333333333333 + x2 * (0.13333333333333333 + x2 * (
        -0.05396825396825397 + x2 * (0.021869488536155203 + x2 * (-0.008863235529902197 + x2 * (
            0.003592128036572481 + x2 * -0.0014558343870513183)))))))
    t = tl.where(ax < 0.5, small, large)
    return tl.where(x < 0.0, -t, t)


SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)
GELU_C = tl.constexpr(0.044715)


@triton.jit
def gelu_tanh(x, NEED_GRAD: tl.constexpr):
    """(gelu_tanh(x), its derivative if NEED_GRAD else the value again), fp32, no libdevice.

    gelu_tanh(x) = ½x(1 + tanh(u)) = x·σ(2u),  u = √(2/π)(x + 0.044715x³)
    derivative   = ½(1 + tanh(u)) + ½x(1 − tanh²(u))·u' = σ(2u)·(1 + 2x·σ(−2u)·u'),  u' = √(2/π)(1 + 3·0.044715x²)
    Written with σ(±2u): 1 + tanh and 1 − tanh² cancel where tanh is near ∓1 and ±1 (|x| of a few), losing
    the digits an fp32 tanh carries (fuzz: GeGLU's fp32 backward 1.6× over its bound).
    x·u' overflows past |x| ~ 1e13, and 0·inf was NaN where the derivative is 0 or 1: the second term takes x
    clamped to ±12, where σ(2u) (x < 0) or σ(−2u) (x > 0) is already 0 in fp32, so no finite value changes."""
    u = SQRT_2_OVER_PI * (x + GELU_C * x * x * x)
    s = tl.sigmoid(2.0 * u)
    a = x * s
    if NEED_GRAD:
        xc = tl.minimum(tl.maximum(x, -12.0), 12.0)
        da = s * (1.0 + 2.0 * xc * tl.sigmoid(-2.0 * u) * SQRT_2_OVER_PI * (1.0 + 3.0 * GELU_C * xc * xc))
    else:
        da = a
    return a, da


def dot_precision(dtype: torch.dtype) -> str:
    """`tl.dot` input_precision: fp32 callers expect fp32 accuracy (torch's default matmul is not tf32);
    bf16/fp16 ignore it."""
    return "ieee" if dtype == torch.float32 else "tf32"


def upcast(dtype: torch.dtype) -> bool:
    """True when loaded bf16/fp16 tiles must be converted to fp32 before arithmetic: the interpreter
    computes bf16/fp16 dots (and bf16 arithmetic) wrongly; on the GPU tensor cores take them directly."""
    return INTERPRET and dtype != torch.float32


def unit_stride(vector: torch.Tensor | None) -> torch.Tensor | None:
    """Kernels read a per-column vector (bias, norm weight) at ptr + n: a strided or expanded (stride-0) one is
    copied first (N elements); None stays None."""
    return vector if vector is None or vector.stride(-1) == 1 else vector.contiguous()


def split_rows(M: int, n_tiles: int, per_sm: int, sms: int, block_m: int) -> tuple[int, int]:
    """(splits, rows_per_split) of a split-M reduction: enough splits that the grid covers the chip `per_sm`
    times (at least 4 row-blocks a split), each split a whole number of BLOCK_M rows; partials summed after."""
    splits = max(1, min(cdiv(per_sm * sms, n_tiles), cdiv(M, 4 * block_m)))
    rows_per_split = cdiv(cdiv(M, splits), block_m) * block_m
    return cdiv(M, rows_per_split), rows_per_split


def split_partials(cfg: dict, length: int, n_tiles: int, block: str, device, *shapes):
    """A split reduction's launch plan: (cfg without PER_SM, splits, length_per_split, fp32 partial buffers of shape
    (splits, *shape) for each shape): `length` (the reduced dimension) split in whole cfg[block]s over a grid of
    n_tiles × splits (split_rows). Sum the partials with `sum_partials`."""
    cfg = dict(cfg)
    splits, per_split = split_rows(length, n_tiles, cfg.pop("PER_SM"), device_sms(device), cfg[block])
    return cfg, splits, per_split, [torch.empty((splits, *s), device=device, dtype=torch.float32) for s in shapes]


def sum_partials(part: torch.Tensor) -> torch.Tensor:
    return part[0] if part.shape[0] == 1 else part.sum(0)
