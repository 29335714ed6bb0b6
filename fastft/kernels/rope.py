"""Rotary position embedding of q and k in one launch, in place or into new tensors, with its inverse.

transformers' layout (rotate_half): the head dimension splits into halves x = [x1, x2] and

    forward:  o1 = x1·c1 − x2·s1      o2 = x2·c2 + x1·s2
    inverse:  o1 = x1·c1 + x2·s2      o2 = x2·c2 − x1·s1      (the transpose, i.e. the backward)

with cos/sin rows (c1, c2) and (s1, s2) per token, exactly as the rotary embedding module produced them (for
packed sequences the positions already restart inside them). One program per token: it loads the token's
cos/sin once and rotates every q head and every k head (GQA: different head counts) in fp32, one rounding.

Tensors are addressed as (B, S, H, D) through explicit strides, so the transpose views transformers makes
((B, H, S, D) of a (B, S, H·D) projection) need no copy.
"""
from __future__ import annotations

import torch

from fastft.kernels.rounding import emulate_rtne, round_to
from fastft.kernels.launch import jit
from fastft.kernels.runtime import next_power_of_2, on_operand_device, triton

import triton.language as tl


@triton.jit
def _rotate_heads(src, dst, b, s, n_heads, sb, ss, sh, sd, ob, os, oh, od, c1, c2, s1, s2, HALF,
                  INVERSE: tl.constexpr, RTNE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    heads = tl.arange(0, BLOCK_H)
    cols = tl.arange(0, BLOCK_HALF)
    mask = (heads[:, None] < n_heads) & (cols[None, :] < HALF)
    src_row = src + b * sb + s * ss + heads[:, None].to(tl.int64) * sh
    dst_row = dst + b * ob + s * os + heads[:, None].to(tl.int64) * oh
    x1 = tl.load(src_row + cols[None, :] * sd, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src_row + (cols[None, :] + HALF) * sd, mask=mask, other=0.0).to(tl.float32)
    if INVERSE:
        o1 = x1 * c1[None, :] + x2 * s2[None, :]
        o2 = x2 * c2[None, :] - x1 * s1[None, :]
    else:
        o1 = x1 * c1[None, :] - x2 * s1[None, :]
        o2 = x2 * c2[None, :] + x1 * s2[None, :]
    tl.store(dst_row + cols[None, :] * od, round_to(o1, dst.dtype.element_ty, RTNE), mask=mask)
    tl.store(dst_row + (cols[None, :] + HALF) * od, round_to(o2, dst.dtype.element_ty, RTNE), mask=mask)


@jit
def _rope_kernel(q_ptr, q_out, k_ptr, k_out, cos_ptr, sin_ptr, S, HQ, HK, HALF,
                 qb, qs, qh, qd, qob, qos, qoh, qod, kb, ks, kh, kd, kob, kos, koh, kod, cb, cs, cd,
                 INVERSE: tl.constexpr, RTNE: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_HALF: tl.constexpr):
    token = tl.program_id(0)
    b = (token // S).to(tl.int64)
    s = (token % S).to(tl.int64)
    cols = tl.arange(0, BLOCK_HALF)
    cmask = cols < HALF
    crow = b * cb + s * cs
    c1 = tl.load(cos_ptr + crow + cols * cd, mask=cmask, other=0.0).to(tl.float32)
    c2 = tl.load(cos_ptr + crow + (cols + HALF) * cd, mask=cmask, other=0.0).to(tl.float32)
    s1 = tl.load(sin_ptr + crow + cols * cd, mask=cmask, other=0.0).to(tl.float32)
    s2 = tl.load(sin_ptr + crow + (cols + HALF) * cd, mask=cmask, other=0.0).to(tl.float32)
    _rotate_heads(q_ptr, q_out, b, s, HQ, qb, qs, qh, qd, qob, qos, qoh, qod, c1, c2, s1, s2, HALF,
                  INVERSE, RTNE, BLOCK_HQ, BLOCK_HALF)
    _rotate_heads(k_ptr, k_out, b, s, HK, kb, ks, kh, kd, kob, kos, koh, kod, c1, c2, s1, s2, HALF,
                  INVERSE, RTNE, BLOCK_HK, BLOCK_HALF)


def launch_warps(block_hq: int, block_hk: int, block_half: int) -> int:
    """One warp per 256 elements of the widest head tile, at most 16: a 64-head × 128-column tile spills 48–64 B
    on 8 warps under triton 3.6 (sm_90 check)."""
    return min(max((max(block_hq, block_hk) * block_half) // 256, 1), 16)


def table_strides(t: torch.Tensor) -> tuple[int, int, int]:
    """The (batch, token, column) strides the kernel reads a (B or 1, S, D) cos/sin table with: a batch of 1 is
    broadcast (stride 0), as `expand` would make it."""
    sb, ss, sd = t.stride()
    return (0 if t.shape[0] == 1 else sb), ss, sd


def _bshd_strides(t: torch.Tensor, heads_first: bool) -> tuple[int, ...]:
    sb, s1, s2, sd = t.stride()
    return (sb, s2, s1, sd) if heads_first else (sb, s1, s2, sd)


@on_operand_device
def rope_rotate(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, q_out: torch.Tensor,
                k_out: torch.Tensor, inverse: bool = False, heads_first: bool = False) -> None:
    """Rotate q (B, S, HQ, D) and k (B, S, HK, D) — (B, HQ, S, D) and (B, HK, S, D) with heads_first, read through
    their strides (no transposed views: each costs host time) — into q_out/k_out of the same layout (which may be
    q/k themselves: each element is read before it is written, by the same program). cos/sin: (B or 1, S, D), any
    strides as long as `table_strides` gives both the same."""
    if heads_first:
        B, HQ, S, D = q.shape
        HK = k.shape[1]
    else:
        B, S, HQ, D = q.shape
        HK = k.shape[2]
    if B * S == 0:
        return
    half = D // 2
    block_half = next_power_of_2(half)
    block_hq, block_hk = next_power_of_2(HQ), next_power_of_2(HK)
    warps = launch_warps(block_hq, block_hk, block_half)
    _rope_kernel[(B * S,)](q, q_out, k, k_out, cos, sin, S, HQ, HK, half, *_bshd_strides(q, heads_first),
                           *_bshd_strides(q_out, heads_first), *_bshd_strides(k, heads_first),
                           *_bshd_strides(k_out, heads_first), *table_strides(cos), INVERSE=inverse,
                           RTNE=emulate_rtne(q_out.dtype), BLOCK_HQ=block_hq, BLOCK_HK=block_hk,
                           BLOCK_HALF=block_half, num_warps=warps)
