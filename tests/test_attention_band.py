"""The band walk every attention kernel shares (fastft/kernels/attention.py `key_band`, `row_band`), checked against
brute force over every (row, key) pair: the visited blocks hold every visible pair, and the unmasked middle holds
only blocks that every row (or key) of the tile sees whole and in bounds. Causal, windows, n_q != n_k, ragged.
"""
from __future__ import annotations

import pytest
import torch

from fastft.kernels.attention import UNBOUNDED, key_band, row_band
from fastft.kernels.runtime import triton
from tests.utils import interpreter_only

import triton.language as tl


@triton.jit
def _bands_kernel(out_ptr, n_q, n_k, left, right, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, KEYS: tl.constexpr):
    i = tl.program_id(0)
    if KEYS:  # program i: query rows i*BLOCK_M.., the key blocks it visits
        lo, full_lo, full_hi, hi = key_band(i * BLOCK_M, BLOCK_M, BLOCK_N, n_q, n_k, left, right)
    else:  # program i: keys i*BLOCK_N.., the query-row blocks that visit it
        lo, full_lo, full_hi, hi = row_band(i * BLOCK_N, BLOCK_N, BLOCK_M, n_q, n_k, left, right)
    tl.store(out_ptr + 4 * i + 0, lo)
    tl.store(out_ptr + 4 * i + 1, full_lo)
    tl.store(out_ptr + 4 * i + 2, full_hi)
    tl.store(out_ptr + 4 * i + 3, hi)


def _visible(i: int, j: int, n_q: int, n_k: int, left: int, right: int) -> bool:
    d = i + n_k - n_q - j
    return -right <= d <= left


def _check(n_q, n_k, left, right, block_m, block_n, keys: bool):
    tile, step, n_tiles, n_steps = (block_m, block_n, n_q, n_k) if keys else (block_n, block_m, n_k, n_q)
    grid = -(-n_tiles // tile)
    out = torch.full((grid, 4), -1, dtype=torch.int32)
    _bands_kernel[(grid,)](out, n_q, n_k, left, right, BLOCK_M=block_m, BLOCK_N=block_n, KEYS=keys)
    for t, (lo, full_lo, full_hi, hi) in enumerate(out.tolist()):
        what = f"{'key' if keys else 'row'}_band tile {t}: {(lo, full_lo, full_hi, hi)}"
        assert 0 <= lo <= full_lo <= full_hi <= hi <= n_steps, what
        assert lo % step == 0, what
        x0 = t * tile
        pair = (lambda x, y: _visible(x, y, n_q, n_k, left, right)) if keys else \
            (lambda x, y: _visible(y, x, n_q, n_k, left, right))
        # every visible pair with both ends in bounds is walked
        for x in range(x0, min(x0 + tile, n_tiles)):
            for y in range(n_steps):
                if pair(x, y):
                    assert lo <= y < hi, f"{what}: ({x}, {y}) visible, not walked"
        if full_hi > full_lo:  # the unmasked middle: whole blocks, every pair of the tile visible and in bounds
            assert full_lo % step == 0 and (full_hi - full_lo) % step == 0, what
            assert x0 + tile <= n_tiles or keys, f"{what}: a ragged key block has an unmasked middle"
            for x in range(x0, x0 + tile):
                for y in range(full_lo, full_hi):
                    assert y < n_steps and pair(x, y), f"{what}: ({x}, {y}) in the unmasked middle"


CASES = [  # n_q, n_k, left, right
    (37, 37, UNBOUNDED, 0),  # causal, ragged
    (50, 50, UNBOUNDED, UNBOUNDED),  # full, ragged key block in every row's view
    (20, 53, UNBOUNDED, 0),  # kv cache: bottom-right aligned
    (60, 25, UNBOUNDED, 0),  # more queries than keys: leading rows see nothing, late ones the ragged key block
    (90, 90, 16, 0),  # sliding window 17
    (50, 50, 8, 8),  # bidirectional window
    (1, 40, UNBOUNDED, 0),  # single query
    (33, 70, 5, 3),
    (20, 34, UNBOUNDED, 0),  # n_k - n_q = 14 = block - 2: an off-by-one in the shift puts a masked key in the middle
    (7, 37, 3, 0),
]


def _random_cases(n: int) -> list[tuple[int, int, int, int]]:
    g = torch.Generator().manual_seed(0)
    draw = lambda lo, hi: int(torch.randint(lo, hi + 1, (), generator=g))  # noqa: E731
    bounds = lambda: (UNBOUNDED, 0, draw(0, 40))[draw(0, 2)]  # noqa: E731
    return [(draw(1, 80), draw(1, 80), bounds(), bounds()) for _ in range(n)]


@interpreter_only
@pytest.mark.parametrize("keys", [True, False], ids=["key_band", "row_band"])
def test_band_walk_matches_brute_force(keys):
    for n_q, n_k, left, right in CASES + _random_cases(40):
        for block_m, block_n in ((16, 16), (16, 32), (32, 16)):
            _check(n_q, n_k, left, right, block_m, block_n, keys)
