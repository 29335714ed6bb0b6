"""FlashAttention backward, recomputing P from the saved log-sum-exp (base 2, scaled scores):

    P = exp2(scale·log2e·Q·Kᵀ − lse)      dV = Pᵀ·dO       dP = dO·Vᵀ
    dS = P ∘ (dP − Δ),  Δ = rowsum(dO ∘ O)    dK = scale·dSᵀ·Q    dQ = scale·dS·K

Kernels: `_attn_bwd_delta_kernel` (Δ), `_attn_bwd_dkdv_kernel` — one program per (key block, sequence,
KV head) holding dK/dV in registers while it walks the row blocks of every query head of its GQA group,
so no atomics are needed for dK/dV, and prefix blocks are the same kernel with PREFIX set (their
gradients go to an fp32 per-sequence buffer that the launcher sums when the prefix is shared) — and
`_attn_bwd_dq_kernel`, one program per (query block, sequence, head), the forward's loop structure.

Two ways to get dQ, picked by the tuner: the dq kernel (recomputes P and dP: 7 matmuls in all, no
atomics, deterministic), or ATOMIC_DQ, where the dK/dV kernel also adds dS·K into an fp32 buffer with
atomics (5 matmuls, FlashAttention-2's choice). Its per-element atomics spill at D = 128; DQ_REDUCE adds the
tile by a TMA reduce-add instead (FlashAttention-3's choice): a candidate, not yet run on a GPU.

Hopper (USE_TMA): every tile — Q/dO row blocks, K/V key blocks, the dK/dV/dQ outputs — goes through tensor
descriptors; pointer tiles keep per-element 64-bit addresses live from load to store, which spilled at D=128.
"""
from __future__ import annotations

import functools


import torch

from fastft.kernels.autotune import tuner
from fastft.kernels.attention import (
    LOG2E,
    block_d,
    grid_rows,
    head_rows,
    key_band,
    load_tile,
    program_bh,
    program_seq_head,
    row_band,
    stats_row,
    store_tile,
    tile_source,
    tma_eligible,
    token_strides,
    visible,
)
from fastft.kernels.shared import bucket, dot_precision, upcast
from fastft.kernels.launch import jit
from fastft.kernels.runtime import (deterministic, ensure_descriptor_allocator, INTERPRET, on_operand_device,
                                   triton)

import triton.language as tl


@jit
def _attn_bwd_delta_kernel(
    o_ptr, do_ptr, delta_ptr, cu_ptr,
    stride_ob, stride_os, stride_oh, stride_dob, stride_dos, stride_doh, stride_lb, stride_lh,
    seqlen_q, n_heads,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, VARLEN: tl.constexpr,
):
    b, h, _, start, n_q, _ = program_seq_head(program_bh(), n_heads, 1, cu_ptr, seqlen_q, seqlen_q, VARLEN)
    m0 = tl.program_id(0) * BLOCK_M
    if m0 >= n_q:
        return
    o_base = head_rows(o_ptr, b, start, h, stride_ob, stride_os, stride_oh)
    do_base = head_rows(do_ptr, b, start, h, stride_dob, stride_dos, stride_doh)
    o = load_tile(o_base, stride_os, m0, n_q, BLOCK_M, BLOCK_D, HEAD_DIM, False, True).to(tl.float32)
    do = load_tile(do_base, stride_dos, m0, n_q, BLOCK_M, BLOCK_D, HEAD_DIM, False, True).to(tl.float32)
    rows = m0 + tl.arange(0, BLOCK_M)
    tl.store(stats_row(delta_ptr, b, h, start, stride_lb, stride_lh) + rows, tl.sum(o * do, 1), mask=rows < n_q)


@triton.jit
def _dkdv_steps(dk, dv, k, v, q_src, do_src, g, stride_qh, stride_doh, stride_q, stride_do, lse_ptr, delta_ptr,
                row_off, dq_dst, stride_dq, lo, hi, n_q, keys, n_keys, shift, left, right, qk_scale,
                BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr, MASK: tl.constexpr,
                ATOMIC_DQ: tl.constexpr, DQ_REDUCE: tl.constexpr, USE_TMA: tl.constexpr, UPCAST: tl.constexpr,
                DOT_PRECISION: tl.constexpr):
    """Row blocks [lo, hi) of one query head against this program's keys, in the transposed frame
    (scores are [BLOCK_N, BLOCK_M]). MASK: 0 all visible, 1 positions and bounds, 2 key bound only;
    rows past n_q load lse = +inf, so their P is 0 without a mask."""
    offs_m = tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    for m0 in tl.range(lo, hi, BLOCK_M):
        rows = m0 + offs_m
        if USE_TMA:  # [n_q, group, D] descriptors: head g's [BLOCK_M, 1, BLOCK_D] box
            q = q_src.load([m0, g, 0]).reshape(BLOCK_M, BLOCK_D)
            do = do_src.load([m0, g, 0]).reshape(BLOCK_M, BLOCK_D)
        else:  # the group's first head; head g is g head strides on (int64: a head is S·D in (B, H, S, D) storage)
            g64 = tl.cast(g, tl.int64)  # (g is a Python int under the interpreter: no .to)
            q = load_tile(q_src + g64 * stride_qh, stride_q, m0, n_q, BLOCK_M, BLOCK_D, HEAD_DIM, False, MASK != 0)
            do = load_tile(do_src + g64 * stride_doh, stride_do, m0, n_q, BLOCK_M, BLOCK_D, HEAD_DIM, False, MASK != 0)
        if MASK != 0:
            lse = tl.load(lse_ptr + row_off + rows, mask=rows < n_q, other=float("inf"))
            delta = tl.load(delta_ptr + row_off + rows, mask=rows < n_q, other=0.0)
        else:
            lse = tl.load(lse_ptr + row_off + rows)
            delta = tl.load(delta_ptr + row_off + rows)
        if UPCAST:
            q = q.to(tl.float32)
            do = do.to(tl.float32)
        s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION)
        p_t = tl.math.exp2(s_t * qk_scale - lse[None, :])
        # Masking P (not S) also drops keys past the end, whose zero K could make exp2 overflow.
        if MASK == 1:
            p_t = tl.where(visible(keys + shift, rows, n_q, right, left) & (keys < n_keys)[:, None], p_t, 0.0)
        elif MASK == 2:
            p_t = tl.where((keys < n_keys)[:, None], p_t, 0.0)
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        ds_t = (p_t * (dp_t - delta[None, :])).to(q.dtype)
        dk = tl.dot(ds_t, q, dk, input_precision=DOT_PRECISION)
        if DQ_REDUCE:  # dQᵀ = Kᵀ·dSᵀ: M = D for the warpgroup MMA (dS·K's M = BLOCK_M < 64 took mma.sync)
            dq_t = tl.dot(tl.trans(k), ds_t, input_precision=DOT_PRECISION)
            dq_dst.atomic_add([m0, g, 0], tl.trans(dq_t).reshape(BLOCK_M, 1, BLOCK_D))  # a TMA reduce-add
        elif ATOMIC_DQ:
            dq = tl.dot(tl.trans(ds_t), k, input_precision=DOT_PRECISION)
            # relaxed: only the sum matters, no ordering with other memory
            tl.atomic_add(dq_dst + rows.to(tl.int64)[:, None] * stride_dq + cols[None, :], dq,
                          mask=(rows < n_q)[:, None] & (cols < HEAD_DIM)[None, :], sem="relaxed")
    return dk, dv


@jit
def _attn_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, cu_ptr, dk_ptr, dv_ptr, dq_ptr,
    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    stride_dob, stride_dos, stride_doh, stride_dkb, stride_dks, stride_dkh, stride_dvb, stride_dvs, stride_dvh,
    stride_dqb, stride_dqs, stride_dqh, stride_lb, stride_lh,
    seqlen_q, seqlen_k, n_prefix, n_kv_heads, group, qk_scale, sm_scale, left, right,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    VARLEN: tl.constexpr, PREFIX: tl.constexpr, ATOMIC_DQ: tl.constexpr, DQ_REDUCE: tl.constexpr,
    USE_TMA: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """PREFIX: k/v/dk/dv address the prefix (n_prefix keys per sequence, no token start, never masked).
    ATOMIC_DQ: dS·K added into dq (fp32) with atomics, per element; DQ_REDUCE (with USE_TMA): a tile at a time, by
    a TMA reduce-add through a descriptor, where per-element addresses spilled at D = 128."""
    b, kvh, _, start, n_q, n_k = program_seq_head(program_bh(), n_kv_heads, 1, cu_ptr, seqlen_q, seqlen_k, VARLEN)
    n0 = tl.program_id(0) * BLOCK_N
    if PREFIX:
        n_k = n_prefix
        k_start = start * 0
    else:
        k_start = start
    if n0 >= n_k:
        return
    keys = n0 + tl.arange(0, BLOCK_N)
    # Descriptors for the key-block tiles too: pointer tiles would keep [BLOCK_N, BLOCK_D] 64-bit row
    # offsets alive from the K/V load to the dK/dV store, which spilled at D=128.
    k_src = tile_source(k_ptr, b, k_start, kvh, stride_kb, stride_ks, stride_kh, n_k, BLOCK_N, BLOCK_D, HEAD_DIM,
                        USE_TMA)
    v_src = tile_source(v_ptr, b, k_start, kvh, stride_vb, stride_vs, stride_vh, n_k, BLOCK_N, BLOCK_D, HEAD_DIM,
                        USE_TMA)
    dk_dst = tile_source(dk_ptr, b, k_start, kvh, stride_dkb, stride_dks, stride_dkh, n_k, BLOCK_N, BLOCK_D,
                         HEAD_DIM, USE_TMA)
    dv_dst = tile_source(dv_ptr, b, k_start, kvh, stride_dvb, stride_dvs, stride_dvh, n_k, BLOCK_N, BLOCK_D,
                         HEAD_DIM, USE_TMA)
    k = load_tile(k_src, stride_ks, n0, n_k, BLOCK_N, BLOCK_D, HEAD_DIM, USE_TMA, True)
    v = load_tile(v_src, stride_vs, n0, n_k, BLOCK_N, BLOCK_D, HEAD_DIM, USE_TMA, True)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)

    shift = n_q - n_k
    if PREFIX:
        lo = 0
        full_lo = 0
        full_hi = 0
        hi = n_q
    else:
        lo, full_lo, full_hi, hi = row_band(n0, BLOCK_N, BLOCK_M, n_q, n_k, left, right)

    # The group's query heads, one descriptor each for Q and dO made once, a head picked by its middle index:
    # per-head descriptors cost a device-side build per head, and registers that pushed D=128 into spilling.
    q_grp = head_rows(q_ptr, b, start, kvh * group, stride_qb, stride_qs, stride_qh)
    do_grp = head_rows(do_ptr, b, start, kvh * group, stride_dob, stride_dos, stride_doh)
    if USE_TMA:
        q_src = tl.make_tensor_descriptor(q_grp, shape=[n_q, group, HEAD_DIM], strides=[stride_qs, stride_qh, 1],
                                          block_shape=[BLOCK_M, 1, BLOCK_D])
        do_src = tl.make_tensor_descriptor(do_grp, shape=[n_q, group, HEAD_DIM],
                                           strides=[stride_dos, stride_doh, 1], block_shape=[BLOCK_M, 1, BLOCK_D])
    else:
        q_src = q_grp
        do_src = do_grp
    if DQ_REDUCE:  # the group's dQ rows, laid out as Q's
        dq_grp = tl.make_tensor_descriptor(head_rows(dq_ptr, b, start, kvh * group, stride_dqb, stride_dqs, stride_dqh),
                                           shape=[n_q, group, HEAD_DIM], strides=[stride_dqs, stride_dqh, 1],
                                           block_shape=[BLOCK_M, 1, BLOCK_D])
    for g in range(group):
        h = kvh * group + g
        # one offset for both (delta is laid out as lse): the kernel's pointer arguments cost no registers
        row_off = b.to(tl.int64) * stride_lb + h * stride_lh + start
        if DQ_REDUCE:
            dq_dst = dq_grp
        else:
            dq_dst = head_rows(dq_ptr, b, start, h, stride_dqb, stride_dqs, stride_dqh)
        # (head g of the group, its lse/delta offset, dQ rows): the same for every row-block range below
        head = (g, stride_qh, stride_doh, stride_qs, stride_dos, lse_ptr, delta_ptr, row_off, dq_dst, stride_dqs)
        keys_args = (n_q, keys, n_k, shift, left, right, qk_scale)
        if PREFIX:
            dk, dv = _dkdv_steps(dk, dv, k, v, q_src, do_src, *head, lo, hi, *keys_args,
                                 BLOCK_M, BLOCK_D, HEAD_DIM, 2, ATOMIC_DQ, DQ_REDUCE, USE_TMA, UPCAST, DOT_PRECISION)
        else:
            dk, dv = _dkdv_steps(dk, dv, k, v, q_src, do_src, *head, lo, full_lo, *keys_args,
                                 BLOCK_M, BLOCK_D, HEAD_DIM, 1, ATOMIC_DQ, DQ_REDUCE, USE_TMA, UPCAST, DOT_PRECISION)
            dk, dv = _dkdv_steps(dk, dv, k, v, q_src, do_src, *head, full_lo, full_hi, *keys_args,
                                 BLOCK_M, BLOCK_D, HEAD_DIM, 0, ATOMIC_DQ, DQ_REDUCE, USE_TMA, UPCAST, DOT_PRECISION)
            dk, dv = _dkdv_steps(dk, dv, k, v, q_src, do_src, *head, full_hi, hi, *keys_args,
                                 BLOCK_M, BLOCK_D, HEAD_DIM, 1, ATOMIC_DQ, DQ_REDUCE, USE_TMA, UPCAST, DOT_PRECISION)

    store_tile(dk_dst, stride_dks, n0, n_k, (dk * sm_scale).to(dk_ptr.dtype.element_ty),
               BLOCK_N, BLOCK_D, HEAD_DIM, USE_TMA)
    store_tile(dv_dst, stride_dvs, n0, n_k, dv.to(dv_ptr.dtype.element_ty), BLOCK_N, BLOCK_D, HEAD_DIM, USE_TMA)


@triton.jit
def _dq_steps(dq, q, do, lse, delta, k_src, v_src, stride_k, stride_v, lo, hi, n_keys, q_pos, left, right,
              qk_scale, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr, MASK: tl.constexpr,
              USE_TMA: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """dQ over key blocks [lo, hi); MASK as in the forward (0 none, 1 positions and bounds, 2 bounds)."""
    offs_n = tl.arange(0, BLOCK_N)
    for n0 in tl.range(lo, hi, BLOCK_N):
        k = load_tile(k_src, stride_k, n0, n_keys, BLOCK_N, BLOCK_D, HEAD_DIM, USE_TMA, MASK != 0)
        v = load_tile(v_src, stride_v, n0, n_keys, BLOCK_N, BLOCK_D, HEAD_DIM, USE_TMA, MASK != 0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        p = tl.math.exp2(s * qk_scale - lse[:, None])
        if MASK == 1:
            p = tl.where(visible(q_pos, n0 + offs_n, n_keys, left, right), p, 0.0)
        elif MASK == 2:
            p = tl.where((n0 + offs_n)[None, :] < n_keys, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)
    return dq


@jit
def _attn_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, pk_ptr, pv_ptr, do_ptr, lse_ptr, delta_ptr, cu_ptr, dq_ptr,
    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    stride_pkb, stride_pks, stride_pkh, stride_pvb, stride_pvs, stride_pvh,
    stride_dob, stride_dos, stride_doh, stride_dqb, stride_dqs, stride_dqh, stride_lb, stride_lh,
    seqlen_q, seqlen_k, n_prefix, n_heads, group, qk_scale, sm_scale, left, right,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    VARLEN: tl.constexpr, HAS_PREFIX: tl.constexpr, USE_TMA: tl.constexpr, UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    b, h, kvh, start, n_q, n_k = program_seq_head(program_bh(), n_heads, group, cu_ptr, seqlen_q, seqlen_k, VARLEN)
    m0 = pid_m * BLOCK_M
    if m0 >= n_q:
        return
    k_src = tile_source(k_ptr, b, start, kvh, stride_kb, stride_ks, stride_kh, n_k, BLOCK_N, BLOCK_D, HEAD_DIM, USE_TMA)
    v_src = tile_source(v_ptr, b, start, kvh, stride_vb, stride_vs, stride_vh, n_k, BLOCK_N, BLOCK_D, HEAD_DIM, USE_TMA)
    # the row-block tiles through descriptors too (pointer tiles spilled their row offsets at D=128)
    q_src = tile_source(q_ptr, b, start, h, stride_qb, stride_qs, stride_qh, n_q, BLOCK_M, BLOCK_D, HEAD_DIM, USE_TMA)
    do_src = tile_source(do_ptr, b, start, h, stride_dob, stride_dos, stride_doh, n_q, BLOCK_M, BLOCK_D, HEAD_DIM,
                         USE_TMA)
    dq_dst = tile_source(dq_ptr, b, start, h, stride_dqb, stride_dqs, stride_dqh, n_q, BLOCK_M, BLOCK_D, HEAD_DIM,
                         USE_TMA)
    q = load_tile(q_src, stride_qs, m0, n_q, BLOCK_M, BLOCK_D, HEAD_DIM, USE_TMA, True)
    do = load_tile(do_src, stride_dos, m0, n_q, BLOCK_M, BLOCK_D, HEAD_DIM, USE_TMA, True)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    rows = m0 + tl.arange(0, BLOCK_M)
    lse = tl.load(stats_row(lse_ptr, b, h, start, stride_lb, stride_lh) + rows, mask=rows < n_q, other=float("inf"))
    delta = tl.load(stats_row(delta_ptr, b, h, start, stride_lb, stride_lh) + rows, mask=rows < n_q, other=0.0)
    q_pos = rows + (n_k - n_q)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    if HAS_PREFIX:  # prefix keys: rows 0 .. n_prefix-1 of every sequence, no token start
        pk_src = tile_source(pk_ptr, b, 0, kvh, stride_pkb, stride_pks, stride_pkh, n_prefix, BLOCK_N, BLOCK_D,
                             HEAD_DIM, USE_TMA)
        pv_src = tile_source(pv_ptr, b, 0, kvh, stride_pvb, stride_pvs, stride_pvh, n_prefix, BLOCK_N, BLOCK_D,
                             HEAD_DIM, USE_TMA)
        dq = _dq_steps(dq, q, do, lse, delta, pk_src, pv_src, stride_pks, stride_pvs, 0, n_prefix, n_prefix,
                       q_pos, left, right, qk_scale, BLOCK_N, BLOCK_D, HEAD_DIM, 2, USE_TMA, UPCAST, DOT_PRECISION)

    lo, full_lo, full_hi, hi = key_band(m0, BLOCK_M, BLOCK_N, n_q, n_k, left, right)
    dq = _dq_steps(dq, q, do, lse, delta, k_src, v_src, stride_ks, stride_vs, lo, full_lo, n_k, q_pos, left, right,
                   qk_scale, BLOCK_N, BLOCK_D, HEAD_DIM, 1, USE_TMA, UPCAST, DOT_PRECISION)
    dq = _dq_steps(dq, q, do, lse, delta, k_src, v_src, stride_ks, stride_vs, full_lo, full_hi, n_k, q_pos, left,
                   right, qk_scale, BLOCK_N, BLOCK_D, HEAD_DIM, 0, USE_TMA, UPCAST, DOT_PRECISION)
    dq = _dq_steps(dq, q, do, lse, delta, k_src, v_src, stride_ks, stride_vs, full_hi, hi, n_k, q_pos, left, right,
                   qk_scale, BLOCK_N, BLOCK_D, HEAD_DIM, 1, USE_TMA, UPCAST, DOT_PRECISION)
    store_tile(dq_dst, stride_dqs, m0, n_q, (dq * sm_scale).to(dq_ptr.dtype.element_ty),
               BLOCK_M, BLOCK_D, HEAD_DIM, USE_TMA)


# ----------------------------------------------------------------------------------------------
# Launch configs: BLOCK_N × BLOCK_M for the dK/dV kernel (keys × rows), BLOCK_M2 × BLOCK_N2 for dQ, per head
# dim. The dK/dV kernel holds two [BLOCK_N, D] fp32 accumulators beside the recomputed P and dP: at D = 128
# FlashAttention-2/3's 128 keys × 64 rows over 8 warps leaves no room in 255 registers a thread under Triton
# (624 B spilled with 2 stages before descriptors for every tile, 72 B after, one local load an inner step;
# 24 B of prologue scalars with 1 stage: both stay tuner options), so the main config takes 32-row blocks as
# the Triton tutorial does (128 × 32) but with 8 warps, which halves the accumulators' registers a thread.
# Every other D ≤ 128 config compiles without spills (tests/sm90_compile.py `attention all`, triton 3.7; under
# 3.6, the GPU machine's, the 128 × 64 options spill 40-272 B and the main config's varlen dK/dV 8 / 40 B,
# D = 64 / 128; the D ≤ 64 pointer configs were picked clean under both). Atomic dQ
# spills ≥ 200 B at D = 128, so it is offered only for D ≤ 64. D = 256 with descriptors: 64 keys × 32 or
# 16 rows, 0 B (64 × 64 spilled 440 B); its pointer fallback still spills (~330 B).

@functools.lru_cache(maxsize=None)
def backward_configs(dtype: torch.dtype, head_dim: int, tma_ok: bool, deterministic: bool = False,
                     candidates: bool = False) -> list[dict]:
    """The tuner's configs. candidates=True adds those no GPU run has checked yet: benchmarks/gpu_attention.py and
    the GPU test of every config check and time them, tests/sm90_compile.py `attention all` compiles them; the tuner
    takes them once a run backs them (a config never run on a GPU could be silently wrong there)."""
    def cfg(bn, bm, warps, stages, bm2, bn2, dq_warps, dq_stages, atomic=False, tma=False, reduce=False):
        return dict(BLOCK_N=bn, BLOCK_M=bm, WARPS=warps, STAGES=stages, BLOCK_M2=bm2, BLOCK_N2=bn2,
                    DQ_WARPS=dq_warps, DQ_STAGES=dq_stages, ATOMIC_DQ=atomic or reduce, USE_TMA=tma or reduce,
                    DQ_REDUCE=reduce)

    configs: list[dict]
    bd = block_d(head_dim)
    if INTERPRET:  # atomic dQ: one kernel fewer to interpret (tests force the dQ kernel too)
        configs = [cfg(32, 16, 4, 1, 32, 16, 4, 1, True, tma_ok)]
    elif dtype == torch.float32 and bd > 128:
        configs = [cfg(32, 16, 4, 1, 32, 16, 4, 1), cfg(16, 16, 4, 1, 16, 16, 4, 1, atomic=True)]
    elif dtype == torch.float32:
        configs = [cfg(64, 32, 4, 2, 64, 32, 4, 2), cfg(32, 32, 4, 2, 32, 32, 4, 2, atomic=True)]
    elif bd > 128:
        configs = [cfg(64, 32, 8, 2, 64, 32, 8, 2, tma=tma_ok), cfg(64, 16, 8, 2, 64, 64, 8, 2, tma=tma_ok),
                   cfg(32, 32, 4, 2, 32, 32, 4, 2)]
    elif bd == 128 and tma_ok:  # 128 × 32 rows (main); FA2/FA3's 128 × 64 on 2 stages and on 1; pointers
        configs = [cfg(128, 32, 8, 2, 128, 64, 8, 2, tma=True),
                   cfg(128, 64, 8, 2, 128, 64, 8, 2, tma=True),
                   cfg(128, 64, 8, 1, 128, 128, 8, 2, tma=True),
                   cfg(64, 64, 8, 2, 64, 32, 8, 2)]
        if candidates:  # 4-warp tiles (sm_90, triton 3.6; docs/gpu-results.md): the main dK/dV with a 64 × 32 dQ
            # (65.5 KB, 140 registers: three blocks an SM where the main dQ, 131 KB, runs one); a 64 × 32 dK/dV
            # (65.8 KB, 252 registers, no spills; varlen 40 B as the main one's) with either dQ: two blocks an SM
            # where the main dK/dV (253 registers on 8 warps) fills the register file alone — the same 8 warps, but
            # two blocks whose softmax and MMA phases need not line up
            configs += [cfg(128, 32, 8, 2, 64, 32, 4, 2, tma=True),
                        cfg(64, 32, 4, 2, 128, 64, 8, 2, tma=True),
                        cfg(64, 32, 4, 2, 64, 32, 4, 2, tma=True)]
            # dQ in the dK/dV kernel by TMA reduce-adds (FlashAttention-2/3's five matmuls, where the dQ kernel
            # recomputes P and dP: seven): the main tile, and on 1 stage (0 B; 2 stages: 40 B a thread, loaded
            # outside the MMA loops, 168 B with the prefix keys). 128 × 64 (80-96 B), 64 × 32 on 4 warps (16-24 B)
            # and 128 × 16 (32-64 B) spill more (triton 3.6)
            configs += [cfg(128, 32, 8, 2, 128, 64, 8, 2, reduce=True), cfg(128, 32, 8, 1, 128, 64, 8, 2, reduce=True)]
    elif bd == 128:  # pointers only (head dims 72..120, unaligned strides)
        configs = [cfg(64, 64, 8, 2, 64, 32, 8, 2), cfg(64, 32, 8, 2, 128, 16, 8, 2)]
    elif tma_ok:  # D <= 64: FA2's 128 keys × 64 rows; atomic dQ on 32-row blocks; pointers
        configs = [cfg(128, 64, 8, 2, 128, 64, 8, 2, tma=True),
                   cfg(128, 32, 8, 2, 128, 64, 8, 2, atomic=True, tma=True),
                   cfg(128, 32, 8, 2, 128, 32, 8, 3, tma=True),
                   cfg(128, 32, 8, 2, 128, 64, 8, 2)]
    else:  # D <= 64 on pointers: 128 × 64 (2 stages) and 64 × 64 (3) spill 128-448 B under triton 3.6
        configs = [cfg(128, 32, 8, 2, 128, 64, 8, 2), cfg(128, 32, 8, 2, 128, 64, 8, 2, atomic=True),
                   cfg(64, 64, 8, 2, 128, 32, 8, 3)]
    if deterministic:
        configs = [c for c in configs if not c["ATOMIC_DQ"]] or [dict(configs[0], ATOMIC_DQ=False, DQ_REDUCE=False)]
    return configs


@on_operand_device
def attention_backward(do, q, k, v, o, lse, *, sm_scale: float, left: int, right: int, cu_seqlens=None,
                       max_seqlen=None, prefix_k=None, prefix_v=None, config: dict | None = None,
                       dq=None, dk=None, dv=None):
    """Launch the backward on validated inputs (do with a unit last stride). Returns
    (dq, dk, dv, dprefix_k, dprefix_v); the prefix gradients are None without a prefix."""
    varlen = cu_seqlens is not None
    n_heads, head_dim = q.shape[-2], q.shape[-1]
    n_kv = k.shape[-2]
    group = n_heads // n_kv
    if varlen:
        batch, seqlen_q, seqlen_k = cu_seqlens.numel() - 1, int(max_seqlen), int(max_seqlen)
    else:
        batch, seqlen_q, seqlen_k = q.shape[0], q.shape[1], k.shape[1]
    dev = q.device
    dq = dq if dq is not None else torch.empty(q.shape, dtype=q.dtype, device=dev)
    dk = dk if dk is not None else torch.empty(k.shape, dtype=k.dtype, device=dev)
    dv = dv if dv is not None else torch.empty(v.shape, dtype=v.dtype, device=dev)
    stride_lb, stride_lh = (0, lse.stride(0)) if varlen else (lse.stride(0), lse.stride(1))
    cu = cu_seqlens if varlen else q
    BD = block_d(head_dim)
    qk_scale = sm_scale * LOG2E

    delta = torch.empty_like(lse)
    _attn_bwd_delta_kernel[grid_rows(batch, n_heads, seqlen_q, 64)](
        o, do, delta, cu, *token_strides(o, varlen), *token_strides(do, varlen), stride_lb, stride_lh,
        seqlen_q, n_heads, HEAD_DIM=head_dim, BLOCK_D=BD, BLOCK_M=64, VARLEN=varlen,
    )

    has_prefix = prefix_k is not None
    n_prefix = prefix_k.shape[1] if has_prefix else 0
    if has_prefix:
        # fp32 per-sequence prefix gradients; summed below when one prefix serves every sequence
        dpk = torch.empty((batch, n_prefix, n_kv, head_dim), dtype=torch.float32, device=dev)
        dpv = torch.empty_like(dpk)
        pk_strides, pv_strides = token_strides(prefix_k, False), token_strides(prefix_v, False)
        if prefix_k.shape[0] == 1:
            pk_strides, pv_strides = (0, *pk_strides[1:]), (0, *pv_strides[1:])
    tma_ok = tma_eligible(head_dim, q, k, v, do, dq, dk, dv,
                          *((prefix_k, prefix_v, dpk, dpv) if has_prefix else ()))
    common = dict(HEAD_DIM=head_dim, BLOCK_D=BD, VARLEN=varlen, UPCAST=upcast(q.dtype),
                  DOT_PRECISION=dot_precision(q.dtype))
    q_strides, do_strides = token_strides(q, varlen), token_strides(do, varlen)

    def launch(cfg):
        use_tma = cfg["USE_TMA"] and tma_ok
        if use_tma:
            ensure_descriptor_allocator()
        atomic = cfg["ATOMIC_DQ"]
        dq_acc = torch.zeros(q.shape, dtype=torch.float32, device=dev) if atomic else dq
        # the TMA reduce needs descriptors; without them the same sums go through per-element atomics
        meta = dict(common, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], ATOMIC_DQ=atomic,
                    DQ_REDUCE=bool(cfg.get("DQ_REDUCE")) and use_tma, USE_TMA=use_tma,
                    num_warps=cfg["WARPS"], num_stages=cfg["STAGES"])
        kv_grid = grid_rows(batch, n_kv, seqlen_k, cfg["BLOCK_N"])
        _attn_bwd_dkdv_kernel[kv_grid](
            q, k, v, do, lse, delta, cu, dk, dv, dq_acc,
            *q_strides, *token_strides(k, varlen), *token_strides(v, varlen), *do_strides,
            *token_strides(dk, varlen), *token_strides(dv, varlen), *token_strides(dq_acc, varlen),
            stride_lb, stride_lh, seqlen_q, seqlen_k, n_prefix, n_kv, group, qk_scale, sm_scale, left, right,
            PREFIX=False, **meta,
        )
        if has_prefix:
            _attn_bwd_dkdv_kernel[grid_rows(batch, n_kv, n_prefix, cfg["BLOCK_N"])](
                q, prefix_k, prefix_v, do, lse, delta, cu, dpk, dpv, dq_acc,
                *q_strides, *pk_strides, *pv_strides, *do_strides,
                *token_strides(dpk, False), *token_strides(dpv, False), *token_strides(dq_acc, varlen),
                stride_lb, stride_lh, seqlen_q, seqlen_k, n_prefix, n_kv, group, qk_scale, sm_scale, left, right,
                PREFIX=True, **meta,
            )
        if atomic:
            torch.mul(dq_acc, sm_scale, out=dq)  # scaled in fp32, rounded once to dq's dtype: one pass
            return
        _attn_bwd_dq_kernel[grid_rows(batch, n_heads, seqlen_q, cfg["BLOCK_M2"])](
            q, k, v, prefix_k if has_prefix else q, prefix_v if has_prefix else q, do, lse, delta, cu, dq,
            *q_strides, *token_strides(k, varlen), *token_strides(v, varlen),
            *(pk_strides if has_prefix else (0, 0, 0)), *(pv_strides if has_prefix else (0, 0, 0)),
            *do_strides, *token_strides(dq, varlen), stride_lb, stride_lh,
            seqlen_q, seqlen_k, n_prefix, n_heads, group, qk_scale, sm_scale, left, right,
            BLOCK_M=cfg["BLOCK_M2"], BLOCK_N=cfg["BLOCK_N2"], HAS_PREFIX=has_prefix, USE_TMA=use_tma,
            num_warps=cfg["DQ_WARPS"], num_stages=cfg["DQ_STAGES"], **common,
        )

    if config is not None:
        launch(config)
    else:
        key = (q.dtype, head_dim, group, varlen, has_prefix, right == 0, left < seqlen_k, tma_ok,
               bucket(seqlen_q), bucket(seqlen_k), bucket(batch * n_heads))
        configs = backward_configs(q.dtype, head_dim, tma_ok, deterministic())
        tuner("attention_bwd", configs).run(key, launch)

    if not has_prefix:
        return dq, dk, dv, None, None
    if prefix_k.shape[0] == 1 and batch > 1:
        dpk, dpv = dpk.sum(0, keepdim=True), dpv.sum(0, keepdim=True)
    return dq, dk, dv, dpk.to(prefix_k.dtype), dpv.to(prefix_v.dtype)
