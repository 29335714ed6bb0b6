"""FlashAttention in Triton: what the forward (attention_fwd.py) and backward (attention_bwd.py) kernels share.

Notation. Row i of q attends key j when it is *visible*:

    -right <= (i + off) - j <= left,     off = n_k - n_q   (causal masks align bottom-right, as FA2 does)

`left`/`right` encode causal and sliding-window masks: causal is right = 0, no window is left = UNBOUNDED,
window w is left = w - 1. Prefix keys (prefix tuning) are visible to every row and never masked.

Layouts. q is (B, S, H, D) and k/v are (B, S, KV, D), any strides with a unit last stride; packed
(varlen) inputs are (T, H, D) with documents at cu_seqlens[b] .. cu_seqlens[b+1]. Launchers reduce both to
(batch stride, token stride, head stride) plus an optional per-document token start. The log-sum-exp is kept
in base 2 of the scaled scores (lse = max + log2(sum)), fp32, in a (B, H, S) or (H, T) buffer.

Blocks. For a tile of rows, `band` splits the key blocks into a masked leading part, a fully visible middle
(no mask arithmetic in that loop) and a masked trailing part; the backward runs the same split transposed.

Written once here for the forward, dK/dV and dQ kernels: the prologue (`program_seq_head`: program → sequence,
head, GQA KV head, token start and lengths; `tile_source`: one head's rows as a descriptor or a pointer, for the
batch, packed and prefix layouts alike; `stats_row`: its lse/Δ row) and the band walk (`key_band` for a query
block's key blocks, `row_band` for a key block's query blocks, both on `band`).
"""
from __future__ import annotations

import torch

from fastft.kernels.host import UNBOUNDED  # noqa: F401  (the attention kernels and ops read it from here)
from fastft.kernels.runtime import cdiv, has_tma, next_power_of_2, triton

import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def band(x0, BLOCK_X: tl.constexpr, BLOCK_Y: tl.constexpr, shift, n_y, below, above):
    """Column blocks for the rows x0 .. x0+BLOCK_X-1, where row x sees columns y < n_y with
    x + shift - below <= y <= x + shift + above.

    Returns lo <= full_lo <= full_hi <= hi: [lo, hi) holds every visible column (as BLOCK_Y blocks from lo),
    [full_lo, full_hi) only blocks that every row sees whole. lo, full_lo, full_hi are multiples of BLOCK_Y.
    """
    # A position ± a bound near 2**31 would wrap in int32: cap the bounds at UNBOUNDED (2**30), which changes no
    # mask for sequences shorter than 2**30 (the ops clamp windows the same way; this guards other callers).
    below = tl.minimum(below, 1 << 30)
    above = tl.minimum(above, 1 << 30)
    first = x0 + shift
    last = x0 + (BLOCK_X - 1) + shift
    lo = tl.maximum(first - below, 0)
    lo = (lo // BLOCK_Y) * BLOCK_Y  # non-negative before dividing: no floor/trunc ambiguity
    hi = tl.maximum(tl.minimum(last + above + 1, n_y), lo)
    full_lo = tl.maximum(last - below, lo)
    full_lo = tl.minimum(((full_lo + BLOCK_Y - 1) // BLOCK_Y) * BLOCK_Y, hi)
    full_hi = tl.maximum(tl.minimum(first + above + 1, n_y), 0)
    full_hi = tl.minimum(tl.maximum((full_hi // BLOCK_Y) * BLOCK_Y, full_lo), hi)
    return lo, full_lo, full_hi, hi


@triton.jit
def key_band(m0, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, n_q, n_k, left, right):
    """`band` of the key blocks that query rows m0 .. m0+BLOCK_M-1 see (row i sits at key position i + n_k - n_q)."""
    return band(m0, BLOCK_M, BLOCK_N, n_k - n_q, n_k, left, right)


@triton.jit
def row_band(n0, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, n_q, n_k, left, right):
    """`band` transposed: the query-row blocks that see keys n0 .. n0+BLOCK_N-1 (left and right swap places).
    A ragged key block (past n_k) has no unmasked middle: its keys past the end must be masked at every step."""
    lo, full_lo, full_hi, hi = band(n0, BLOCK_N, BLOCK_M, n_q - n_k, n_q, right, left)
    if n0 + BLOCK_N > n_k:
        full_lo = hi
        full_hi = hi
    return lo, full_lo, full_hi, hi


@triton.jit
def visible(x_pos, y, n_y, below, above):
    """[len(x_pos), len(y)] mask: column y < n_y lies in [x_pos - below, x_pos + above]."""
    d = x_pos[:, None] - y[None, :]
    return (y[None, :] < n_y) & (d <= below) & (d >= -above)


@triton.jit
def load_tile(src, stride, row0, n_rows, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr,
              USE_TMA: tl.constexpr, CHECK_ROWS: tl.constexpr):
    """Rows row0 .. row0+BLOCK-1 of a (n_rows, HEAD_DIM) matrix as a [BLOCK, BLOCK_D] tile, zeros outside.

    `src` is a tensor descriptor (USE_TMA: bounds come free) or a base pointer with row stride `stride`.
    """
    if USE_TMA:
        tile = src.load([row0, 0])
    else:
        rows = row0 + tl.arange(0, BLOCK)
        cols = tl.arange(0, BLOCK_D)
        ptrs = src + rows.to(tl.int64)[:, None] * stride + cols[None, :]
        if CHECK_ROWS:
            tile = tl.load(ptrs, mask=(rows[:, None] < n_rows) & (cols[None, :] < HEAD_DIM), other=0.0)
        elif BLOCK_D != HEAD_DIM:
            tile = tl.load(ptrs, mask=cols[None, :] < HEAD_DIM, other=0.0)
        else:
            tile = tl.load(ptrs)
    return tile


@triton.jit
def store_tile(dst, stride, row0, n_rows, tile, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr,
               HEAD_DIM: tl.constexpr, USE_TMA: tl.constexpr):
    """Store a [BLOCK, BLOCK_D] tile into rows row0.. of a (n_rows, HEAD_DIM) matrix, clipped at its edges."""
    if USE_TMA:
        dst.store([row0, 0], tile)
    else:
        rows = row0 + tl.arange(0, BLOCK)
        cols = tl.arange(0, BLOCK_D)
        ptrs = dst + rows.to(tl.int64)[:, None] * stride + cols[None, :]
        tl.store(ptrs, tile, mask=(rows[:, None] < n_rows) & (cols[None, :] < HEAD_DIM))


# ----------------------------------------------------------------------------------------------
# Host-side helpers shared by the launchers.

def token_strides(t: torch.Tensor, varlen: bool) -> tuple[int, int, int]:
    """(batch, token, head) strides of a (B, S, H, D) tensor, or of a packed (T, H, D) one (batch stride 0)."""
    s = t.stride()  # (one call: t.stride(i) costs as much as the whole tuple, and launchers call this often)
    return (0, s[0], s[1]) if varlen else (s[0], s[1], s[2])


def block_d(head_dim: int) -> int:
    return max(16, next_power_of_2(head_dim))


def tma_eligible(head_dim: int, *tensors: torch.Tensor) -> bool:
    """Descriptors need a power-of-two head dim (the tile is the full row) and 16-byte aligned addressing. A zero
    stride (an `expand`ed dimension of size > 1) takes the pointer loads too: what a TMA descriptor does with one is
    not something the CPU checks can show (the interpreter emulates descriptors with pointers)."""
    first = tensors[0]
    if not has_tma(first.device) or head_dim != block_d(head_dim) or head_dim > 256:
        return False
    for t in tensors:
        if t is None:
            continue
        size, strides = t.element_size(), t.stride()
        if strides[-1] != 1 or t.data_ptr() % 16:
            return False
        for n, s in zip(t.shape[:-1], strides[:-1]):
            if (s * size) % 16 or (s == 0 and n > 1):
                return False
    return True


# CUDA's limit on a grid's second and third axes (the first takes 2**31 - 1)
MAX_GRID_YZ = 65535


def grid_rows(batch: int, heads: int, seqlen: int, block: int) -> tuple[int, int, int]:
    """(row blocks, heads, sequences): sequence · heads as two axes, not one (2,048 packed documents × 32 heads
    would pass the axis limit); programs run in the same order (axis 0 fastest), see program_bh."""
    if batch > MAX_GRID_YZ:
        raise ValueError(f"attention: {batch} sequences (packed documents) in one call; at most {MAX_GRID_YZ} (a "
                         "CUDA grid limit): split the batch")
    return cdiv(max(seqlen, 1), block), heads, batch


@triton.jit
def program_bh():
    """sequence · heads + head of a program of a grid_rows grid (axes 1 and 2)."""
    return tl.program_id(2) * tl.num_programs(1) + tl.program_id(1)


@triton.jit
def doc_bounds(cu_ptr, b, seqlen_q, seqlen_k, VARLEN: tl.constexpr):
    """(first token as int64, n_q, n_k) of sequence b: a packed document, or row b of a padded batch."""
    if VARLEN:
        start = tl.load(cu_ptr + b).to(tl.int64)
        n_q = tl.load(cu_ptr + b + 1) - tl.load(cu_ptr + b)
        n_k = n_q
    else:
        start = b.to(tl.int64) * 0
        n_q = seqlen_q
        n_k = seqlen_k
    return start, n_q, n_k


@triton.jit
def program_seq_head(pid_bh, n_heads, group, cu_ptr, seqlen_q, seqlen_k, VARLEN: tl.constexpr):
    """Program axis pid_bh = sequence · n_heads + head → (sequence b, head h as int64, its KV head h // group (GQA),
    first token, n_q, n_k). The dK/dV kernel numbers KV heads and passes group 1."""
    b = pid_bh // n_heads
    h = (pid_bh % n_heads).to(tl.int64)
    kvh = h // group
    start, n_q, n_k = doc_bounds(cu_ptr, b, seqlen_q, seqlen_k, VARLEN)
    return b, h, kvh, start, n_q, n_k


@triton.jit
def head_rows(ptr, b, start, head, stride_b, stride_s, stride_h):
    """Row 0 of one head of sequence b (its token `start` on in a packed layout): row t is at + t * stride_s.
    64-bit offsets: batch × stride passes 2**31 elements long before a tensor runs out of memory."""
    return ptr + b.to(tl.int64) * stride_b + start * stride_s + head * stride_h


@triton.jit
def tile_source(ptr, b, start, head, stride_b, stride_s, stride_h, n_rows, BLOCK: tl.constexpr,
                BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr, USE_TMA: tl.constexpr):
    """What load_tile/store_tile take for one head's (n_rows, HEAD_DIM) rows: a descriptor of [BLOCK, BLOCK_D]
    boxes (USE_TMA) or the base pointer."""
    base = head_rows(ptr, b, start, head, stride_b, stride_s, stride_h)
    if USE_TMA:
        src = tl.make_tensor_descriptor(base, shape=[n_rows, HEAD_DIM], strides=[stride_s, 1],
                                        block_shape=[BLOCK, BLOCK_D])
    else:
        src = base
    return src


@triton.jit
def stats_row(ptr, b, h, start, stride_lb, stride_lh):
    """Row 0 of (sequence b, head h) in an lse or Δ buffer (laid out alike): fp32, row t at + t."""
    return ptr + b.to(tl.int64) * stride_lb + h * stride_lh + start


