"""Row kernels of the fused linear losses: one program per row of a logits chunk, fp32 inside.

`ce_rows` computes, per row i of a (n, V) logits chunk x with label y_i (optionally softcapped,
z = c·tanh(x/c)), an online log-sum-exp and

    loss_i = (1-ε)·(lse_i - z_{y_i}) + ε·(lse_i - mean_j z_j)            (0 where y_i == ignore_index)

and, when asked, overwrites the chunk in place with its gradient scaled by g_i (a scalar or per-row factor):

    dx_ij = g_i · (softmax(z_i)_j - (1-ε)·[j == y_i] - ε/V) · (1 - (z_ij/c)²)

`kl_rows` does the same for the KL divergence between a student chunk s and a teacher chunk t at
temperature τ (forward KL(p_t‖p_s) or reverse KL(p_s‖p_t)), writing dKL/ds into the student chunk.
Two reads of the chunk and one write: the kernels are memory-bound, ~3·n·V·bytes per chunk.
"""
from __future__ import annotations

import torch

from fastft.kernels.launch import jit
from fastft.kernels.runtime import INTERPRET, next_power_of_2, on_operand_device, triton
from fastft.kernels.shared import tanh

import triton.language as tl


@triton.jit
def _capped(x, softcap, HAS_SOFTCAP: tl.constexpr):
    if HAS_SOFTCAP:
        x = softcap * tanh(x / softcap)
    return x


@jit
def _ce_rows_kernel(
    x_ptr, stride_x, labels_ptr, scale_ptr, scale_stride, loss_ptr,
    V, ignore_index, smoothing, softcap,
    HAS_SOFTCAP: tl.constexpr, HAS_SMOOTHING: tl.constexpr, COMPUTE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    label = tl.load(labels_ptr + row)
    ignored = label == ignore_index
    safe_label = tl.where(ignored, 0, label)

    # pass 1: running max m and sum d of exp(z - m); Σz for label smoothing
    m = float("-inf")
    d = 0.0
    zsum = 0.0
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        mask = cols < V
        z = _capped(tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32), softcap, HAS_SOFTCAP)
        z = tl.where(mask, z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, axis=0))
        # while every logit so far is -inf (masked vocabulary) m_new is too: exp(-inf - -inf) would be NaN
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        d = d * tl.exp(m - m_safe) + tl.sum(tl.exp(z - m_safe), axis=0)
        m = m_new
        if HAS_SMOOTHING:
            zsum += tl.sum(tl.where(mask, z, 0.0), axis=0)
    # differences from the max before log d is added: lse = m + log d rounded at |m|'s ulp (1e-3 at logits of 1e4)
    log_d = tl.log(d)
    z_y = _capped(tl.load(x_row + safe_label).to(tl.float32), softcap, HAS_SOFTCAP)
    loss = (m - z_y) + log_d
    if HAS_SMOOTHING:
        loss = (1.0 - smoothing) * loss + smoothing * ((m - zsum / V) + log_d)
    tl.store(loss_ptr + row, tl.where(ignored, 0.0, loss))

    if COMPUTE_GRAD:
        # pass 2: the gradient, written over the logits it was computed from
        g = tl.load(scale_ptr + row * scale_stride).to(tl.float32)
        g = tl.where(ignored, 0.0, g)
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            mask = cols < V
            z = _capped(tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32), softcap, HAS_SOFTCAP)
            dz = tl.exp((z - m) - log_d) - tl.where(cols == safe_label, 1.0 - smoothing, 0.0)
            if HAS_SMOOTHING:
                dz -= smoothing / V
            if HAS_SOFTCAP:
                dz *= 1.0 - (z / softcap) * (z / softcap)
            tl.store(x_row + cols, (dz * g).to(x_ptr.dtype.element_ty), mask=mask)


@jit
def _kl_rows_kernel(
    s_ptr, stride_s, t_ptr, stride_t, labels_ptr, scale_ptr, scale_stride, loss_ptr,
    V, ignore_index, inv_temp,
    HAS_LABELS: tl.constexpr, REVERSE: tl.constexpr, COMPUTE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + row * stride_s
    t_row = t_ptr + row * stride_t
    if HAS_LABELS:
        ignored = tl.load(labels_ptr + row) == ignore_index
    else:
        ignored = row < 0  # never

    # pass 1: online log-sum-exp of both, and w = Σ e^{a-m_a}·((a - m_a) - (b - m_b)) for the distribution a the
    # KL weighs by (a = teacher for forward KL, student for reverse), m the running maxima. Each term is a
    # difference of log-probs up to a constant, exact for the dominant ones; Σ p_a·(a - b) minus the two
    # log-sum-exps instead cancels (~1e-3 absolute at logits of 1e4). When the maxima move, every earlier term
    # shifts by the change of (m_a - m_b): w = e^{m_a - m_a'}·(w - d_a·shift) + the new block's terms.
    ms = float("-inf")
    ds = 0.0
    mt = float("-inf")
    dt = 0.0
    w = 0.0
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        mask = cols < V
        s = tl.load(s_row + cols, mask=mask, other=float("-inf")).to(tl.float32) * inv_temp
        t = tl.load(t_row + cols, mask=mask, other=float("-inf")).to(tl.float32) * inv_temp
        ms_new = tl.maximum(ms, tl.max(s, axis=0))
        mt_new = tl.maximum(mt, tl.max(t, axis=0))
        es = tl.exp(s - ms_new)
        et = tl.exp(t - mt_new)
        if REVERSE:
            rel = tl.where(mask, (s - ms_new) - (t - mt_new), 0.0)
            shift = tl.where(ds > 0, ds * ((ms_new - ms) - (mt_new - mt)), 0.0)  # nothing before the first block
            w = tl.exp(ms - ms_new) * (w - shift) + tl.sum(es * rel, axis=0)
        else:
            rel = tl.where(mask, (t - mt_new) - (s - ms_new), 0.0)
            shift = tl.where(dt > 0, dt * ((mt_new - mt) - (ms_new - ms)), 0.0)
            w = tl.exp(mt - mt_new) * (w - shift) + tl.sum(et * rel, axis=0)
        ds = ds * tl.exp(ms - ms_new) + tl.sum(es, axis=0)
        dt = dt * tl.exp(mt - mt_new) + tl.sum(et, axis=0)
        ms = ms_new
        mt = mt_new
    log_ds = tl.log(ds)
    log_dt = tl.log(dt)
    if REVERSE:  # Σ p_s (log p_s - log p_t)
        kl = w / ds - log_ds + log_dt
    else:  # Σ p_t (log p_t - log p_s)
        kl = w / dt - log_dt + log_ds
    tl.store(loss_ptr + row, tl.where(ignored, 0.0, kl))

    if COMPUTE_GRAD:
        g = tl.load(scale_ptr + row * scale_stride).to(tl.float32) * inv_temp
        g = tl.where(ignored, 0.0, g)
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            mask = cols < V
            s = tl.load(s_row + cols, mask=mask, other=0.0).to(tl.float32) * inv_temp
            t = tl.load(t_row + cols, mask=mask, other=0.0).to(tl.float32) * inv_temp
            # differences from the max first (as in _ce_rows_kernel: s - lse_s rounds at the ulp of |lse_s|)
            log_ps = (s - ms) - log_ds
            ps = tl.exp(log_ps)
            if REVERSE:  # d/ds Σ p_s (log p_s - log p_t) = p_s·(log p_s - log p_t - KL)
                ds_ = ps * (log_ps - ((t - mt) - log_dt) - kl)
            else:  # d/ds Σ p_t (log p_t - log p_s) = p_s - p_t
                ds_ = ps - tl.exp((t - mt) - log_dt)
            tl.store(s_row + cols, (ds_ * g).to(s_ptr.dtype.element_ty), mask=mask)


def _block_v(V: int) -> tuple[int, int]:
    """(BLOCK_V, num_warps): wide blocks on the GPU (few loop trips over 128k columns), small under the
    interpreter so tests walk several blocks and a ragged tail."""
    if INTERPRET:
        return min(64, next_power_of_2(V)), 4
    block = min(4096, next_power_of_2(V))
    return block, (16 if block >= 4096 else 8 if block >= 2048 else 4)


@on_operand_device
def _launch_rows(kernel, chunk: torch.Tensor, scale: torch.Tensor, args, **constexprs) -> torch.Tensor:
    """One program per row of the (n, V) chunk; returns the fp32 (n,) row losses the kernel writes.
    `args(loss, scale_stride)` gives the kernel's arguments; scale is fp32, one value (broadcast: stride 0) or n."""
    n, V = chunk.shape
    loss = torch.empty(n, dtype=torch.float32, device=chunk.device)
    if n == 0:
        return loss
    block, warps = _block_v(V)
    kernel[(n,)](*args(loss, 0 if scale.numel() == 1 else 1), **constexprs, BLOCK_V=block, num_warps=warps)
    return loss


def ce_rows(x: torch.Tensor, labels: torch.Tensor, scale: torch.Tensor, *, ignore_index: int,
            label_smoothing: float, softcap: float | None, compute_grad: bool) -> torch.Tensor:
    """Per-row loss (fp32, n) of the (n, V) logits chunk x (unit last stride); with compute_grad, x is
    overwritten with scale·dloss/dx. labels: int64 (n,), contiguous; scale: fp32 contiguous, 1 or n values."""
    return _launch_rows(
        _ce_rows_kernel, x, scale,
        lambda loss, scale_stride: (x, x.stride(0), labels, scale, scale_stride, loss, x.shape[1], ignore_index,
                                    float(label_smoothing), float(softcap or 1.0)),
        HAS_SOFTCAP=softcap is not None, HAS_SMOOTHING=label_smoothing > 0.0, COMPUTE_GRAD=compute_grad)


def kl_rows(s: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None, scale: torch.Tensor, *,
            ignore_index: int, temperature: float, reverse: bool, compute_grad: bool) -> torch.Tensor:
    """Per-row KL (fp32, n) between student chunk s and teacher chunk t, both (n, V) with unit last stride;
    with compute_grad, s is overwritten with scale·dKL/ds. Rows whose label is ignore_index give 0."""
    return _launch_rows(
        _kl_rows_kernel, s, scale,
        lambda loss, scale_stride: (s, s.stride(0), t, t.stride(0), labels if labels is not None else loss, scale,
                                    scale_stride, loss, s.shape[1], ignore_index, 1.0 / float(temperature)),
        HAS_LABELS=labels is not None, REVERSE=reverse, COMPUTE_GRAD=compute_grad)
