"""FlashAttention forward: O = softmax(scale·Q·Kᵀ + mask)·V with an online softmax, saving only the log-sum-exp.

One program per (query block, sequence, head). It keeps its Q tile, an fp32 accumulator and the running
row max / row sum in registers, and walks the key blocks it can see: the prefix keys first (never masked),
then the blocks `band` returns — masked edges and an unmasked middle, so the bulk of the work carries no
mask arithmetic. GQA maps head h to KV head h // group; K/V are never repeated in memory.

Hopper: Q/K/V/O go through tensor descriptors (TMA) when the head dim is a power of two and addresses are
16-byte aligned; the unmasked loop may be warp-specialized, the grid persistent (PERSISTENT: one program a
multiprocessor walking the row blocks). All are launch options the tuner may drop.
"""
from __future__ import annotations

import functools

import torch

from fastft.kernels.autotune import tuner
from fastft.kernels.attention import (
    LOG2E,
    block_d,
    grid_rows,
    key_band,
    load_tile,
    program_bh,
    program_seq_head,
    stats_row,
    store_tile,
    tile_source,
    tma_eligible,
    token_strides,
    visible,
)
from fastft.kernels.shared import bucket, dot_precision, upcast
from fastft.kernels.launch import jit
from fastft.kernels.runtime import device_sms, ensure_descriptor_allocator, INTERPRET, on_operand_device, triton

import triton.language as tl


@triton.jit
def _fwd_steps(acc, m_i, l_i, q, k_src, v_src, stride_k, stride_v, lo, hi, n_keys, q_pos, left, right, qk_scale,
               BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr, MASK: tl.constexpr,
               USE_TMA: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
               WARP_SPECIALIZE: tl.constexpr):
    """Online-softmax steps over key blocks [lo, hi). MASK: 0 every key visible, 1 positions and bounds,
    2 bounds only (prefix). m_i is the running max of the scaled scores (base 2), l_i the running sum."""
    offs_n = tl.arange(0, BLOCK_N)
    for n0 in tl.range(lo, hi, BLOCK_N, warp_specialize=WARP_SPECIALIZE):
        k = load_tile(k_src, stride_k, n0, n_keys, BLOCK_N, BLOCK_D, HEAD_DIM, USE_TMA, MASK != 0)
        v = load_tile(v_src, stride_v, n0, n_keys, BLOCK_N, BLOCK_D, HEAD_DIM, USE_TMA, MASK != 0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        if MASK == 1:
            s = tl.where(visible(q_pos, n0 + offs_n, n_keys, left, right), s, float("-inf"))
        elif MASK == 2:
            s = tl.where((n0 + offs_n)[None, :] < n_keys, s, float("-inf"))
        # scale > 0, so scaling the row max equals the max of the scaled row (one multiply per row)
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        if MASK != 0:
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet
        else:
            m_use = m_new
        p = tl.math.exp2(s * qk_scale - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _fwd_tile(
    pid_m, pid_bh,
    q_ptr, k_ptr, v_ptr, pk_ptr, pv_ptr, o_ptr, lse_ptr, cu_ptr,
    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    stride_pkb, stride_pks, stride_pkh, stride_pvb, stride_pvs, stride_pvh,
    stride_ob, stride_os, stride_oh, stride_lb, stride_lh,
    seqlen_q, seqlen_k, n_prefix, n_heads, group, qk_scale, left, right,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    VARLEN: tl.constexpr, HAS_PREFIX: tl.constexpr, USE_TMA: tl.constexpr, UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr, WARP_SPECIALIZE: tl.constexpr,
):
    """Rows pid_m*BLOCK_M.. of sequence and head pid_bh: nothing when the block starts past the sequence."""
    b, h, kvh, start, n_q, n_k = program_seq_head(pid_bh, n_heads, group, cu_ptr, seqlen_q, seqlen_k, VARLEN)
    m0 = pid_m * BLOCK_M
    if m0 < n_q:
        q_src = tile_source(q_ptr, b, start, h, stride_qb, stride_qs, stride_qh, n_q,
                            BLOCK_M, BLOCK_D, HEAD_DIM, USE_TMA)
        k_src = tile_source(k_ptr, b, start, kvh, stride_kb, stride_ks, stride_kh, n_k,
                            BLOCK_N, BLOCK_D, HEAD_DIM, USE_TMA)
        v_src = tile_source(v_ptr, b, start, kvh, stride_vb, stride_vs, stride_vh, n_k,
                            BLOCK_N, BLOCK_D, HEAD_DIM, USE_TMA)
        o_dst = tile_source(o_ptr, b, start, h, stride_ob, stride_os, stride_oh, n_q,
                            BLOCK_M, BLOCK_D, HEAD_DIM, USE_TMA)

        q = load_tile(q_src, stride_qs, m0, n_q, BLOCK_M, BLOCK_D, HEAD_DIM, USE_TMA, True)
        if UPCAST:
            q = q.to(tl.float32)
        rows = m0 + tl.arange(0, BLOCK_M)
        q_pos = rows + (n_k - n_q)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

        if HAS_PREFIX:  # the prefix keys have no token start: every sequence's are rows 0 .. n_prefix-1
            pk_src = tile_source(pk_ptr, b, 0, kvh, stride_pkb, stride_pks, stride_pkh, n_prefix,
                                 BLOCK_N, BLOCK_D, HEAD_DIM, USE_TMA)
            pv_src = tile_source(pv_ptr, b, 0, kvh, stride_pvb, stride_pvs, stride_pvh, n_prefix,
                                 BLOCK_N, BLOCK_D, HEAD_DIM, USE_TMA)
            acc, m_i, l_i = _fwd_steps(acc, m_i, l_i, q, pk_src, pv_src, stride_pks, stride_pvs, 0, n_prefix,
                                       n_prefix, q_pos, left, right, qk_scale, BLOCK_N, BLOCK_D, HEAD_DIM, 2,
                                       USE_TMA, UPCAST, DOT_PRECISION, False)

        lo, full_lo, full_hi, hi = key_band(m0, BLOCK_M, BLOCK_N, n_q, n_k, left, right)
        acc, m_i, l_i = _fwd_steps(acc, m_i, l_i, q, k_src, v_src, stride_ks, stride_vs, lo, full_lo, n_k, q_pos,
                                   left, right, qk_scale, BLOCK_N, BLOCK_D, HEAD_DIM, 1,
                                   USE_TMA, UPCAST, DOT_PRECISION, False)
        acc, m_i, l_i = _fwd_steps(acc, m_i, l_i, q, k_src, v_src, stride_ks, stride_vs, full_lo, full_hi, n_k,
                                   q_pos, left, right, qk_scale, BLOCK_N, BLOCK_D, HEAD_DIM, 0,
                                   USE_TMA, UPCAST, DOT_PRECISION, WARP_SPECIALIZE)
        acc, m_i, l_i = _fwd_steps(acc, m_i, l_i, q, k_src, v_src, stride_ks, stride_vs, full_hi, hi, n_k, q_pos,
                                   left, right, qk_scale, BLOCK_N, BLOCK_D, HEAD_DIM, 1,
                                   USE_TMA, UPCAST, DOT_PRECISION, False)

        # Rows that see no key at all (possible only when n_q > n_k) output 0 and get lse = +inf, so the
        # backward's exp2(s - lse) is 0 for them.
        empty = l_i == 0.0
        l_safe = tl.where(empty, 1.0, l_i)
        out = acc / l_safe[:, None]
        store_tile(o_dst, stride_os, m0, n_q, out.to(o_ptr.dtype.element_ty), BLOCK_M, BLOCK_D, HEAD_DIM, USE_TMA)
        lse = tl.where(empty, float("inf"), m_i + tl.math.log2(l_safe))
        tl.store(stats_row(lse_ptr, b, h, start, stride_lb, stride_lh) + rows, lse, mask=rows < n_q)


@jit
def _attn_fwd_kernel(
    q_ptr, k_ptr, v_ptr, pk_ptr, pv_ptr, o_ptr, lse_ptr, cu_ptr,
    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    stride_pkb, stride_pks, stride_pkh, stride_pvb, stride_pvs, stride_pvh,
    stride_ob, stride_os, stride_oh, stride_lb, stride_lh,
    seqlen_q, seqlen_k, n_prefix, n_heads, group, qk_scale, left, right, n_seqs,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    VARLEN: tl.constexpr, HAS_PREFIX: tl.constexpr, USE_TMA: tl.constexpr, UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr, WARP_SPECIALIZE: tl.constexpr, PERSISTENT: tl.constexpr,
):
    """One program per (row block, sequence·head), or PERSISTENT: a grid of about the SM count, each program
    walking tiles pid, pid + grid, ... of the same order (every head's last row block first)."""
    if PERSISTENT:
        n_m = tl.cdiv(seqlen_q, BLOCK_M)
        n_bh = n_seqs * n_heads
        for tile in range(tl.program_id(0), n_m * n_bh, tl.num_programs(0)):
            _fwd_tile(n_m - 1 - tile // n_bh, tile % n_bh,
                      q_ptr, k_ptr, v_ptr, pk_ptr, pv_ptr, o_ptr, lse_ptr, cu_ptr,
                      stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs,
                      stride_vh, stride_pkb, stride_pks, stride_pkh, stride_pvb, stride_pvs, stride_pvh,
                      stride_ob, stride_os, stride_oh, stride_lb, stride_lh,
                      seqlen_q, seqlen_k, n_prefix, n_heads, group, qk_scale, left, right,
                      HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, VARLEN, HAS_PREFIX, USE_TMA, UPCAST, DOT_PRECISION,
                      WARP_SPECIALIZE)
    else:  # causal: the longest rows start first
        _fwd_tile(tl.num_programs(0) - 1 - tl.program_id(0), program_bh(),
                  q_ptr, k_ptr, v_ptr, pk_ptr, pv_ptr, o_ptr, lse_ptr, cu_ptr,
                  stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
                  stride_pkb, stride_pks, stride_pkh, stride_pvb, stride_pvs, stride_pvh,
                  stride_ob, stride_os, stride_oh, stride_lb, stride_lh,
                  seqlen_q, seqlen_k, n_prefix, n_heads, group, qk_scale, left, right,
                  HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, VARLEN, HAS_PREFIX, USE_TMA, UPCAST, DOT_PRECISION,
                  WARP_SPECIALIZE)


# ----------------------------------------------------------------------------------------------
# Launch configs. Few on purpose: each costs a compile. BLOCK_M=128 × BLOCK_N=128 with 8 warps and 3
# stages is the usual Hopper sweet spot for D ≤ 128; 256-wide heads need smaller tiles for shared memory.
# At D = 128 the others run 8 warps too: with 4 warps the [128, 128] fp32 accumulator alone takes 128
# registers a thread and the sm_90 compile spilled (40 B with descriptors, 1264 B on pointers, whose
# per-element addresses stay live as well); pointer configs take 32 keys a step there. Descriptor configs
# compile without spills, pointer ones with at most 24 B (tests/sm90_compile.py `attention all`). PERSISTENT
# launches one program a multiprocessor that walks the row blocks in the same order (prepared, not yet timed).

@functools.lru_cache(maxsize=None)
def forward_configs(dtype: torch.dtype, head_dim: int, tma_ok: bool) -> list[dict]:
    def cfg(bm, bn, warps, stages, tma=False, ws=False, persistent=False):
        return dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages, USE_TMA=tma, WARP_SPECIALIZE=ws,
                    PERSISTENT=persistent)

    bd = block_d(head_dim)
    if INTERPRET:
        return [cfg(32, 32, 4, 1, tma_ok)]
    if dtype == torch.float32:  # exact (ieee) fp32 dots: for tests and references, not speed
        return [cfg(32, 32, 4, 1), cfg(16, 32, 4, 1)] if bd > 128 else [cfg(64, 32, 4, 2), cfg(32, 32, 4, 2)]
    if bd > 128:  # 256-wide rows: smaller tiles to fit shared memory and registers
        return [cfg(64, 64, 4, 2, tma_ok), cfg(128, 64, 8, 2, tma_ok), cfg(64, 32, 4, 2)]
    if tma_ok:  # the last one, on plain pointers, stays in case descriptors fail to compile here
        warps = 4 if bd <= 64 else 8
        pointers = cfg(128, 64, 8, 3) if bd <= 64 else cfg(128, 32, 8, 3)
        # persistent at D = 128 on 64-key steps: 128 x 128 needed 263 KB of shared memory (3 stages) or spilled
        persistent = cfg(128, 128 if bd <= 64 else 64, 8, 3, True, persistent=True)
        # no warp-specialized config on sm_90: triton 3.6/3.7 ignore the flag with 8 warps (identical SASS) and
        # their Hopper pass fails on this loop with 4 ("'scf.for' op operation destroyed but still has uses")
        return [cfg(128, 128, 8, 3, True), persistent, cfg(128, 64, warps, 3, True),
                cfg(128, 128, 8, 2, True), pointers]
    if bd == 128:
        return [cfg(128, 32, 8, 3), cfg(128, 64, 8, 3), cfg(64, 64, 8, 3)]
    return [cfg(128, 64, 8, 3), cfg(128, 128, 8, 2), cfg(64, 64, 4, 3)]


@on_operand_device
def attention_forward(q, k, v, *, sm_scale: float, left: int, right: int, cu_seqlens=None, max_seqlen=None,
                      prefix_k=None, prefix_v=None, config: dict | None = None, out=None, lse=None):
    """Launch the forward on validated inputs; returns (o, lse). `config` forces a launch config (tests);
    `out`/`lse` let tests pass pre-poisoned buffers."""
    varlen = cu_seqlens is not None
    n_heads, head_dim = q.shape[-2], q.shape[-1]
    n_kv = k.shape[-2]
    if varlen:
        batch, seqlen_q, seqlen_k = cu_seqlens.numel() - 1, int(max_seqlen), int(max_seqlen)
    else:
        batch, seqlen_q, seqlen_k = q.shape[0], q.shape[1], k.shape[1]
    o = out if out is not None else torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if lse is None:
        shape = (n_heads, q.shape[0]) if varlen else (batch, n_heads, seqlen_q)
        lse = torch.empty(shape, dtype=torch.float32, device=q.device)
    stride_lb, stride_lh = (0, lse.stride(0)) if varlen else (lse.stride(0), lse.stride(1))
    has_prefix = prefix_k is not None
    n_prefix = prefix_k.shape[1] if has_prefix else 0
    pk, pv = (prefix_k, prefix_v) if has_prefix else (q, q)
    pk_strides = token_strides(pk, False) if has_prefix else (0, 0, 0)
    pv_strides = token_strides(pv, False) if has_prefix else (0, 0, 0)
    if has_prefix and prefix_k.shape[0] == 1:  # one prefix shared by every sequence
        pk_strides, pv_strides = (0, *pk_strides[1:]), (0, *pv_strides[1:])
    tma_ok = tma_eligible(head_dim, q, k, v, o, *((prefix_k, prefix_v) if has_prefix else ()))

    def launch(cfg):
        cfg = dict(cfg)
        use_tma = cfg.pop("USE_TMA") and tma_ok
        if use_tma:
            ensure_descriptor_allocator()
        persistent = cfg.pop("PERSISTENT", False)
        grid = grid_rows(batch, n_heads, seqlen_q, cfg["BLOCK_M"])
        if persistent:  # one resident program a multiprocessor (8 warps of up to 255 registers fill one)
            grid = (max(1, min(grid[0] * grid[1] * grid[2], device_sms(q.device))),)
        _attn_fwd_kernel[grid](
            q, k, v, pk, pv, o, lse, cu_seqlens if varlen else q,
            *token_strides(q, varlen), *token_strides(k, varlen), *token_strides(v, varlen),
            *pk_strides, *pv_strides, *token_strides(o, varlen), stride_lb, stride_lh,
            seqlen_q, seqlen_k, n_prefix, n_heads, n_heads // n_kv, sm_scale * LOG2E, left, right, batch,
            HEAD_DIM=head_dim, BLOCK_D=block_d(head_dim), VARLEN=varlen, HAS_PREFIX=has_prefix,
            USE_TMA=use_tma, UPCAST=upcast(q.dtype), DOT_PRECISION=dot_precision(q.dtype), PERSISTENT=persistent,
            **cfg,
        )

    if config is not None:
        launch(config)
    else:
        key = (q.dtype, head_dim, n_heads // n_kv, varlen, has_prefix, right == 0, left < seqlen_k, tma_ok,
               bucket(seqlen_q), bucket(seqlen_k), bucket(batch * n_heads))
        tuner("attention_fwd", forward_configs(q.dtype, head_dim, tma_ok)).run(key, launch)
    return o, lse
