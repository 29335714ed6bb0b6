"""The chunked machinery behind fastft.ops.linear_losses: logits one token chunk at a time, never all of them.

For each chunk of n token rows: logits = h·Wᵀ (+ b) (+ s·(drop(h)·Aᵀ)·Bᵀ for a LoRA head) into one reused
(n, V) buffer, a row function (fastft.kernels.cross_entropy on Triton, the torch functions below otherwise)
turns it into per-row losses and overwrites it with dloss/dlogits, then dh = dlogits·W (+ the LoRA term) and
dW += dlogitsᵀ·h, dA, dB, db accumulate. The buffer is the only O(n·V) memory.

Two autograd Functions share that loop:
- `EagerChunkedLoss` (scalar losses: mean, sum): gradients are made in the forward (3 GEMMs in all);
  backward only multiplies them by the incoming scalar.
- `DeferredChunkedLoss` (per-row losses: reduction "none", per-sequence log-probs): the forward makes
  losses only (1 GEMM); backward recomputes each chunk's logits and scales row i's gradient by the
  incoming g_i (3 more GEMMs with a trainable W or LoRA head). When only dh is wanted, the forward makes
  the unscaled dh instead (2 GEMMs in all) and backward scales its rows.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, replace
from typing import Callable

import torch
import torch.nn.functional as F

from fastft.ops.lm_head import HeadArgs
from fastft.ops.shared import autocast_off, first_order_only, power_of_two_scales
from fastft.quant.nf4_weight import NF4Weight

# 96 MiB: 384 rows at V = 128256 in bf16, inside issue 7's 0.1 GiB workspace target; larger chunks cut dW's
# read-modify-write traffic (2·V·H·2 B per chunk) at the cost of memory (benchmarks/gpu_losses.py sweeps both)
DEFAULT_CHUNK_MIB = {"cuda": 96, "cpu": 32}
# dW is accumulated in fp32 when that accumulator fits this; otherwise in W's dtype by addmm (fp32 inside each
# GEMM, one rounding per chunk). fp16 always in fp32: its dlogits are left unscaled (eager_losses), and their sum
# over all tokens would overflow fp16.
FP32_WEIGHT_GRAD_MIB = 256
# add_product's fp32 scratch: a half-precision product is made this many MiB of rows at a time (a 128k×4096 fp16
# dW: 16 GEMMs a chunk; a bf16 dW small enough for fp32, at most 2)
PRODUCT_SCRATCH_MIB = 128
_MM_HAS_OUT_DTYPE = "dtype" in torch.ops.aten.mm.overloads()


def chunk_budget_bytes(device: torch.device) -> int:
    """Bytes one logits chunk may take: FASTFT_LOSS_CHUNK_MIB, else 96 MiB on a GPU, 32 MiB on the CPU."""
    mib = os.environ.get("FASTFT_LOSS_CHUNK_MIB")
    if mib is not None:
        try:
            value = float(mib)
        except ValueError:
            value = -1.0
        if not (value > 0 and math.isfinite(value)):
            raise ValueError(f"FASTFT_LOSS_CHUNK_MIB must be a positive, finite number of MiB, got {mib!r}")
        return int(value * 2**20)
    return DEFAULT_CHUNK_MIB.get(device.type, 128) * 2**20


def chunk_rows(tokens: int, vocab: int, bytes_per_logit: int, budget: int) -> int:
    """Token rows per chunk: as many as the budget allows, a multiple of 64 when above 64 (GEMM tiles),
    at least 1, at most all tokens."""
    rows = max(1, budget // max(1, vocab * bytes_per_logit))
    if rows > 64:
        rows -= rows % 64
    return max(1, min(rows, tokens))


# ----------------------------------------------------------------------------------------------
# the head: logits of a chunk and the gradients that flow back through them

@dataclass(kw_only=True)
class Head(HeadArgs):
    """An lm_head's arguments (fastft.ops.lm_head.HeadArgs) as one call computes with them: in `dtype`, LoRA
    dropout drawn from `seed`, an NF4 weight dequantized `nf4_rows` vocab rows at a time."""
    dtype: torch.dtype
    seed: int = 0
    nf4_rows: int = 4096

    def __post_init__(self):
        # LoRA factors may be fp32 masters: cast once per op call, not once per chunk
        if self.lora_A is not None:
            self.lora_B_in = self.lora_B  # as passed (fp32 masters, as peft keeps them): dA_operand scales these
            self.lora_A, self.lora_B = self.lora_A.to(self.dtype), self.lora_B.to(self.dtype)

    def _keep(self, h: torch.Tensor, t0: int) -> torch.Tensor:
        """The dropout keep-mask of the LoRA input rows starting at t0: the same in forward and backward."""
        gen = torch.Generator(device=h.device)
        gen.manual_seed((self.seed * 1_000_003 + t0) % (2**63 - 1))
        return torch.rand(h.shape, generator=gen, device=h.device) >= self.dropout_p

    def _nf4_blocks(self):
        for v0 in range(0, self.vocab, self.nf4_rows):
            v1 = min(self.vocab, v0 + self.nf4_rows)
            yield v0, v1, self.nf4.dequantize_rows(v0, v1, self.dtype)

    def logits(self, out: torch.Tensor, h: torch.Tensor, t0: int) -> tuple:
        """Writes the (n, V) logits of rows h into out; returns what the gradient needs of this chunk."""
        if self.nf4 is not None:
            for v0, v1, w in self._nf4_blocks():
                out[:, v0:v1] = h @ w.t()
            if self.bias is not None:
                out += self.bias
        elif self.bias is not None:
            torch.addmm(self.bias, h, self.weight.t(), out=out)
        else:
            torch.mm(h, self.weight.t(), out=out)
        if self.lora_A is None:
            return None, None
        hd = h
        if self.dropout_p > 0.0:
            hd = h * self._keep(h, t0).to(h.dtype) / (1.0 - self.dropout_p)
        hA = hd @ self.lora_A.t()
        out.addmm_(hA, self.lora_B.t(), alpha=self.scaling)
        return hd, hA

    def dA_operand(self, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B', c): the factor grad_hidden's returned u = dlogits·B' is made with, and c (r,) with B' = B·diag(c)
        (None: B' = B). fp16 only: there u = dlogits·B is rounded to fp16, and at |B| ~ 1e-4 (B starts at 0 and
        grows by ~lr per step) it fell into fp16's subnormals: dA was 3e-3 off fp64 (3e-2 at |B| ~ 1e-5; peft's fp32
        adapters: 3e-4).
        c_j is the power of two >= 1 that brings max|B_:j|·max|scale| below 1: |u'| stays below |dlogits row|₁ /
        max|scale| (no new overflow; scale: the rows' factor already in dlogits), the products are exact, and
        run_chunks divides dA's row j by c_j at the end (its fp32 sum). No host sync: c stays on the device. Costs
        one more (n, V)·(V, r) GEMM per chunk (u for dh's LoRA term is still made with B)."""
        if self.dtype != torch.float16:
            return self.lora_B, None
        B = self.lora_B_in.detach().float()
        c = power_of_two_scales(B.abs().amax(0) * scale.detach().abs().amax().float(), 0, at_least_one=True)
        return (B * c).to(self.dtype), c

    def grad_hidden(self, dl: torch.Tensor, t0: int, out: torch.Tensor,
                    lora_B_dA: torch.Tensor | None = None) -> torch.Tensor | None:
        """out = dlogits·W (+ the LoRA term); returns dlogits·B (n, r) for the LoRA A gradient (dlogits·lora_B_dA
        when given: dA_operand's B')."""
        if self.nf4 is not None:
            out.zero_()
            for v0, v1, w in self._nf4_blocks():
                out.addmm_(dl[:, v0:v1], w)
        else:
            torch.mm(dl, self.weight, out=out)
        if self.lora_A is None:
            return None
        u = dl @ self.lora_B
        lora = (u @ self.lora_A) * self.scaling
        if self.dropout_p > 0.0:
            lora *= self._keep(out, t0).to(lora.dtype) / (1.0 - self.dropout_p)
        out += lora
        return u if lora_B_dA is None else dl @ lora_B_dA


@dataclass
class Grads:
    """What the chunks accumulate; None for what nobody asked for."""
    hidden: torch.Tensor | None = None
    weight: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    lora_A: torch.Tensor | None = None
    lora_B: torch.Tensor | None = None

    def as_tuple(self):
        return self.hidden, self.weight, self.bias, self.lora_A, self.lora_B


def weight_grad_dtype(weight: torch.Tensor) -> torch.dtype:
    """The dtype dW is accumulated in: fp32 when small (or W is fp32 or fp16), else W's (fp64 stays fp64)."""
    if weight.dtype == torch.float64:
        return weight.dtype
    if weight.dtype in (torch.float32, torch.float16) or weight.numel() * 4 <= FP32_WEIGHT_GRAD_MIB * 2**20:
        return torch.float32
    return weight.dtype


def add_product(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, alpha: float = 1.0) -> None:
    """acc (fp32, or fp64 for fp64 a) += alpha·(a @ b). fp16 / bf16 a, b: the GEMM's fp32 sums are kept in fp32
    (never rounded to a's dtype on the way), PRODUCT_SCRATCH_MIB of a's rows at a time. An fp16 product would
    overflow past 65504 (dlogits are unscaled there, see eager_losses) or, shrunk to avoid that, lose bits below
    6.1e-5: dB's ~1e-4 entries lost 2% that way."""
    if a.dtype not in (torch.float16, torch.bfloat16):
        prod = (a @ b).to(acc.dtype)
        acc += prod if alpha == 1.0 else prod * alpha
        return
    rows = max(1, (PRODUCT_SCRATCH_MIB << 20) // (4 * max(b.shape[1], 1)))
    fp32_out = fp32_output_gemm(a)
    b = b if fp32_out else b.float()  # else fp32 operands (the CPU's mm has no out_dtype): each product exact too
    for r0 in range(0, a.shape[0], rows):
        blk = a[r0:r0 + rows]
        prod = torch.mm(blk, b, out_dtype=torch.float32) if fp32_out else blk.float() @ b
        acc[r0:r0 + rows].add_(prod, alpha=alpha)


def fp32_output_gemm(a: torch.Tensor) -> bool:
    """Whether add_product takes cuBLAS's fp32 output of a's half-precision operands (mm's out_dtype, torch >= 2.8,
    CUDA only). Not for fp16 under torch.backends.cuda.matmul.allow_fp16_accumulation, which torch refuses with an
    fp32 output: fp32 operands then."""
    if not (a.is_cuda and _MM_HAS_OUT_DTYPE):
        return False
    return a.dtype != torch.float16 or not torch.backends.cuda.matmul.allow_fp16_accumulation


def _weight_grad_buffer(weight: torch.Tensor) -> torch.Tensor:
    """fp32 zeros when small (or W is fp32); else uninitialised in W's dtype (the first chunk writes it)."""
    if weight_grad_dtype(weight) == torch.float32:
        return torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
    return torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)


RowFn = Callable[[torch.Tensor, int, int, torch.Tensor, bool], torch.Tensor]


@dataclass
class Plan:
    """One call's fixed parts: the row loss and the tensors its row function reads (`targets`: labels, the
    teacher's rows and head; RowLoss.row_fn), chunk rows, the NF4 / LoRA facts of the head that are not autograd
    inputs, and the reduction's scales."""
    row: RowLoss
    targets: tuple  # (labels2, teacher_h2, teacher_w), None where the loss reads none
    rows: int
    vocab: int
    nf4: NF4Weight | None = None
    nf4_rows: int = 4096
    scaling: float = 1.0
    dropout_p: float = 0.0
    seed: int = 0
    grad_scale: torch.Tensor | None = None  # fp32 (1,): d(loss)/d(row loss), the eager path's row factor
    extra: dict = field(default_factory=dict)

    def head(self, hidden, weight, bias, lora_A, lora_B) -> Head:
        return Head(dtype=hidden.dtype, weight=weight, nf4=self.nf4, bias=bias, lora_A=lora_A,
                    lora_B=lora_B, scaling=self.scaling, dropout_p=self.dropout_p, seed=self.seed,
                    nf4_rows=self.nf4_rows)


@dataclass(frozen=True)
class RowLoss:
    """Which loss the rows of a chunk compute and its options (Python values only: the tensors it reads, labels
    and the teacher's rows and head, come with the call). kind "ce": cross-entropy (and log-probs); "distill":
    distillation terms on one chunk's logits, weights = (KL(teacher‖student), KL(student‖teacher), CE on the
    labels), each row's loss their weighted sum (the logits made, and their gradient taken through the head, once
    for all terms; the teacher's logits of a chunk made beside the student's only when a KL term is weighted).
    linear_kl_div is the weights (1, 0, 0) or (0, 1, 0)."""
    kind: str
    backend: str
    ignore_index: int
    label_smoothing: float = 0.0
    softcap: float | None = None
    temperature: float = 1.0
    weights: tuple[float, ...] = ()

    def row_fn(self, labels2: torch.Tensor | None, teacher_h2: torch.Tensor | None = None,
               teacher_w: torch.Tensor | None = None) -> RowFn:
        if self.backend == "triton":
            from fastft.kernels.cross_entropy import ce_rows, kl_rows
        else:
            ce_rows, kl_rows = ce_rows_torch, kl_rows_torch
        if self.kind == "distill":
            weights = self.weights

            def kl_fn(x, t0, t1, scale, compute_grad):
                # one chunk, freed after the row; not made for CE alone
                teacher_logits = teacher_h2[t0:t1] @ teacher_w.t() if any(weights[:2]) else None
                labels = None if labels2 is None else labels2[t0:t1]
                terms = [(w, lambda xi, s, cg, reverse=reverse: kl_rows(
                              xi, teacher_logits, labels, s, ignore_index=self.ignore_index,
                              temperature=self.temperature, reverse=reverse, compute_grad=cg))
                         for w, reverse in zip(weights[:2], (False, True)) if w]
                if weights[2]:
                    terms.append((weights[2], lambda xi, s, cg: ce_rows(
                        xi, labels, s, ignore_index=self.ignore_index, label_smoothing=0.0, softcap=None,
                        compute_grad=cg)))
                return weighted_rows(x, terms, scale, compute_grad)
            return kl_fn

        def ce_fn(x, t0, t1, scale, compute_grad):
            return ce_rows(x, labels2[t0:t1], scale, ignore_index=self.ignore_index,
                           label_smoothing=self.label_smoothing, softcap=self.softcap, compute_grad=compute_grad)
        return ce_fn


def weighted_rows(x: torch.Tensor, terms: list, scale: torch.Tensor, compute_grad: bool) -> torch.Tensor:
    """Σ wᵢ·lossᵢ per row of the logits chunk x, terms = [(wᵢ, fn(x, scale, compute_grad) -> row losses)]; with
    compute_grad x is overwritten with Σ wᵢ·scale·d lossᵢ/dx. A row function overwrites its input with its
    gradient, so every term but the last reads a copy (one or two chunk-sized buffers more; Plan's chunk rows count
    them). A single term of weight 1 is that term's call alone."""
    if len(terms) == 1 and terms[0][0] == 1.0:
        return terms[0][1](x, scale, compute_grad)
    total = acc = None
    for i, (weight, fn) in enumerate(terms):
        last = i == len(terms) - 1
        xi = x if last or not compute_grad else x.clone()
        loss = weight * fn(xi, scale * weight, compute_grad)
        total = loss if total is None else total + loss
        if compute_grad and not last:
            acc = xi if acc is None else acc.add_(xi)
    if acc is not None:
        x.add_(acc)
    return total


def as_rows(t: torch.Tensor) -> torch.Tensor:
    """(…, H) → (T, H), contiguous (the GEMMs and row slices want it). T spelled out, not -1: H may be 0."""
    return t.reshape(math.prod(t.shape[:-1]), t.shape[-1]).contiguous()


def run_chunks(plan: Plan, head: Head, h2: torch.Tensor, scale: torch.Tensor, losses: torch.Tensor,
               needs: tuple[bool, ...] | None) -> Grads:
    """The loop. needs = (hidden, weight, bias, lora_A, lora_B) gradients wanted, or None for losses only.
    scale: fp32, 1 value or one per row (d(loss)/d(row loss))."""
    T = h2.shape[0]
    row_fn = plan.row.row_fn(*plan.targets)
    grads = Grads()
    if needs is not None:
        need_h, need_w, need_b, need_A, need_B = needs
        grads.hidden = torch.empty_like(h2) if need_h else None
        grads.weight = _weight_grad_buffer(head.weight) if need_w else None
        acc = torch.float64 if head.dtype == torch.float64 else torch.float32
        grads.bias = torch.zeros(head.vocab, dtype=acc, device=h2.device) if need_b else None
        grads.lora_A = torch.zeros(head.lora_A.shape, dtype=acc, device=h2.device) if need_A else None
        grads.lora_B = torch.zeros(head.lora_B.shape, dtype=acc, device=h2.device) if need_B else None
    if T == 0:  # no chunk runs: the uninitialised dW buffer (_weight_grad_buffer) is written here instead
        if grads.weight is not None:
            grads.weight.zero_()
        return grads
    buf = torch.empty(min(plan.rows, T), head.vocab, dtype=head.dtype, device=h2.device)
    lora_B_dA, dA_c = head.dA_operand(scale) if needs is not None and grads.lora_A is not None else (None, None)
    dh_scratch = None
    for t0 in range(0, T, plan.rows):
        t1 = min(T, t0 + plan.rows)
        dl, hc = buf[: t1 - t0], h2[t0:t1]
        hd, hA = head.logits(dl, hc, t0)
        row_scale = scale if scale.numel() == 1 else scale[t0:t1]
        losses[t0:t1] = row_fn(dl, t0, t1, row_scale, needs is not None)
        if needs is None:
            continue
        # dl now holds dloss/dlogits of the chunk
        u = None
        if grads.hidden is not None or grads.lora_A is not None:
            if grads.hidden is not None:
                dh = grads.hidden[t0:t1]
            else:
                dh_scratch = torch.empty_like(hc) if dh_scratch is None else dh_scratch
                dh = dh_scratch[: t1 - t0]
            u = head.grad_hidden(dl, t0, dh, lora_B_dA)
        if grads.weight is not None:
            if grads.weight.dtype == head.dtype and t0 == 0:
                torch.mm(dl.t(), hc, out=grads.weight)  # no memset, no read of zeros
            elif grads.weight.dtype == head.dtype:
                grads.weight.addmm_(dl.t(), hc)
            else:
                add_product(grads.weight, dl.t(), hc)
        if grads.bias is not None:
            grads.bias += dl.sum(0, dtype=grads.bias.dtype)
        if grads.lora_B is not None:
            add_product(grads.lora_B, dl.t(), hA, head.scaling)
        if grads.lora_A is not None:
            add_product(grads.lora_A, u.t(), hd, head.scaling)
    if dA_c is not None:
        grads.lora_A.div_(dA_c[:, None])  # u was made with B·diag(c): dA's row j is c_j times too large
    return grads


# ----------------------------------------------------------------------------------------------
# the bodies both doors share (fastft.ops.compiled): the autograd Functions below (eager) and the custom ops of
# fastft.ops.linear_losses_compiled (torch.compile)

def eager_losses(plan: Plan, hidden, weight, bias, lora_A, lora_B, needs: tuple[bool, ...]):
    """The scalar loss Σ_i row_loss_i · grad_scale and its gradients (Grads, made now; None where not in needs),
    and post_scale: the factor backward still owes them (grad_scale for fp16, else None)."""
    h2 = as_rows(hidden)
    head = plan.head(h2, weight, bias, lora_A, lora_B)
    losses = torch.empty(h2.shape[0], dtype=torch.float32, device=h2.device)
    # fp16 has no room below 6e-8: dlogits scaled by 1/N (N tokens) would flush to zero, and the grad_output
    # that loss scaling brings arrives only in backward. So fp16 chunks keep dlogits unscaled (|·| <= 1) and
    # the reduction's factor joins grad_output there.
    post_scale = plan.grad_scale if head.dtype == torch.float16 else None
    row_scale = torch.ones_like(plan.grad_scale) if post_scale is not None else plan.grad_scale
    grads = run_chunks(plan, head, h2, row_scale, losses, needs if any(needs) else None)
    # 0-d times 0-d: a fresh tensor, not a view. A view output of an autograd Function cannot be changed in place,
    # and transformers.Trainer does `loss *= loss_scale` (average_tokens_across_devices)
    return losses.sum() * plan.grad_scale.squeeze(), grads, post_scale


def scaled_grad(t: torch.Tensor, g: torch.Tensor, dtype: torch.dtype, *, in_place: bool) -> torch.Tensor:
    """A gradient made in the forward times grad_output g (fp32, 1 value), in the input's dtype. in_place: into
    t's own buffer (eager: the Function owns it); else a fresh tensor (a custom op's saved output). Same values.
    Multiplied in fp32: g rounded to bf16 first scaled every gradient of `loss / 3` by 0.334, not 1/3."""
    if t.dtype == torch.float32:
        return (t.mul_(g) if in_place else t * g).to(dtype)
    return times_in_fp32(t, g, dtype, out=t if in_place and t.dtype == dtype else None)


_FP32_TEMP = 1 << 24  # elements of the fp32 temporary times_in_fp32 makes at a time (64 MiB)


def times_in_fp32(t: torch.Tensor, g: torch.Tensor, dtype: torch.dtype, out: torch.Tensor | None = None):
    """t·g in fp32, rounded once to `dtype` (into `out`, which may be t); g fp32: one value, or one per row of t
    ((rows, 1)). Eager: a chunk of rows at a time, so the fp32 temporary stays bounded; traced, one expression
    (inductor fuses it without a temporary)."""
    if torch.compiler.is_compiling() or t.dim() == 0 or t.numel() <= _FP32_TEMP:
        result = (t.float() * g).to(dtype)
        return result if out is None else out.copy_(result)
    out = torch.empty(t.shape, dtype=dtype, device=t.device) if out is None else out
    step = max(1, _FP32_TEMP // (t.numel() // t.shape[0]))
    for i in range(0, t.shape[0], step):
        out[i:i + step].copy_(t[i:i + step].float() * (g if g.numel() == 1 else g[i:i + step]))
    return out


def row_losses(plan: Plan, h2, weight, bias, lora_A, lora_B, dh_only: bool):
    """Per-row losses (T,) fp32 of the rows h2 (as_rows); with dh_only also the unscaled dh rows (T, H)
    (backward scales row t by g_t)."""
    head = plan.head(h2, weight, bias, lora_A, lora_B)
    losses = torch.empty(h2.shape[0], dtype=torch.float32, device=h2.device)
    one = torch.ones(1, dtype=torch.float32, device=h2.device)
    grads = run_chunks(plan, head, h2, one, losses, (True,) + (False,) * 4 if dh_only else None)
    return losses, grads.hidden


def row_losses_backward(plan: Plan, h2, weight, bias, lora_A, lora_B, grad_output, needs: tuple[bool, ...]):
    """The recomputed chunks with row t's gradient scaled by grad_output[t]: (dh rows, dW, db, dA, dB), each in
    its input's dtype, None where not in needs."""
    head = plan.head(h2, weight, bias, lora_A, lora_B)
    scale = grad_output.reshape(-1).float().contiguous()
    losses = torch.empty(h2.shape[0], dtype=torch.float32, device=h2.device)
    grads = run_chunks(plan, head, h2, scale, losses, needs)
    like = (h2, weight, bias, lora_A, lora_B)
    return tuple(None if g is None else g.to(t.dtype) for g, t in zip(grads.as_tuple(), like))


_SECOND_ORDER = ("the fused losses make their gradients chunk by chunk on both backends: for higher-order "
                 "gradients use the plain-torch references (fastft.ops.linear_cross_entropy_reference, "
                 "linear_kl_div_reference, linear_sequence_logprobs_reference, linear_dpo_loss_reference)")


class EagerChunkedLoss(torch.autograd.Function):
    """A scalar loss Σ_i row_loss_i · plan.grad_scale with its gradients made during the forward."""

    @staticmethod
    def forward(ctx, plan: Plan, hidden, weight, bias, lora_A, lora_B):
        needs = tuple(ctx.needs_input_grad[1:6]) if plan.extra.get("grad_enabled", True) else (False,) * 5
        loss, grads, ctx.post_scale = eager_losses(plan, hidden, weight, bias, lora_A, lora_B, needs)
        ctx.shapes = [(t.shape, t.dtype) if t is not None else None for t in (hidden, weight, bias, lora_A, lora_B)]
        ctx.present = [g is not None for g in grads.as_tuple()]
        ctx.save_for_backward(*[g for g in grads.as_tuple() if g is not None])
        ctx.used = False
        return loss

    @staticmethod
    @first_order_only(instead=_SECOND_ORDER)
    def backward(ctx, grad_output):
        if ctx.used:
            # the first backward handed out (or scaled in place) the buffers the gradients live in
            raise RuntimeError("fastft fused linear loss: backward ran twice through the same graph; its gradients "
                               "are made in the forward and handed out by the first backward (recompute the loss "
                               "instead of retain_graph=True)")
        ctx.used = True
        saved = iter(ctx.saved_tensors)
        g = grad_output.float().reshape(1)
        if ctx.post_scale is not None:
            g = g * ctx.post_scale
        unit = _unit_gradient(g, weight_grad=ctx.present[1])
        out = []
        for present, meta in zip(ctx.present, ctx.shapes):
            if not present:
                out.append(None)
                continue
            t = next(saved)
            shape, dtype = meta
            if not unit:
                t = scaled_grad(t, g, dtype, in_place=True)
            elif t.dtype != dtype:
                t = t.to(dtype)
            out.append(t.view(shape))
        return (None, *out)


def _unit_gradient(g: torch.Tensor, *, weight_grad: bool) -> bool:
    """Whether backward may hand the forward's gradients out unscaled (g == 1: loss.backward()). Knowing it reads g:
    free on the CPU, a device sync on a GPU, where it pays only to skip a pass over a weight gradient (V x H); the
    pass over dh alone (T x H) costs less than the sync (fastft train's g is 1/count: the read never paid there).
    Not while torch.compile traces (a read would break the graph). Scaling by exactly 1 changes no bit."""
    if torch.compiler.is_compiling() or not (weight_grad or g.device.type == "cpu"):
        return False
    return bool((g == 1.0).all())


class DeferredChunkedLoss(torch.autograd.Function):
    """Per-row losses (T,); backward recomputes the chunks with row i's gradient scaled by grad_output[i]."""

    @staticmethod
    def forward(ctx, plan: Plan, hidden, weight, bias, lora_A, lora_B):
        ctx.hidden_shape = hidden.shape
        # Only dh wanted (a frozen head, e.g. DPO on LoRA layers): row t's dh is linear in its g_t, so the
        # unscaled dh is made now and backward scales its rows; no recompute (2 GEMMs instead of 3).
        ctx.dh_only = plan.extra.get("grad_enabled", True) and tuple(ctx.needs_input_grad[1:6]) == (
            True, False, False, False, False)
        h2 = as_rows(hidden)
        losses, dh = row_losses(plan, h2, weight, bias, lora_A, lora_B, ctx.dh_only)
        # the targets the recompute reads go through save_for_backward too: an in-place change of the labels or the
        # teacher's rows before backward is then refused by autograd's version check, not silently used
        ctx.plan = replace(plan, targets=())
        if ctx.dh_only:
            ctx.save_for_backward(dh)
        else:
            ctx.save_for_backward(h2, weight, bias, lora_A, lora_B, *plan.targets)
        return losses

    @staticmethod
    @first_order_only(instead=_SECOND_ORDER)
    def backward(ctx, grad_output):
        if ctx.dh_only:
            (dh,) = ctx.saved_tensors
            dh = times_in_fp32(dh, grad_output.reshape(-1, 1).float(), dh.dtype)
            return None, dh.view(ctx.hidden_shape), None, None, None, None
        h2, weight, bias, lora_A, lora_B, *targets = ctx.saved_tensors
        needs = tuple(ctx.needs_input_grad[1:6])
        if not any(needs):
            return None, None, None, None, None, None
        plan = replace(ctx.plan, targets=tuple(targets))
        # as the forward ran: a backward called under torch.autocast would cast add_product's fp32 GEMMs to fp16
        with autocast_off(h2.device.type):
            dh, dW, db, dA, dB = row_losses_backward(plan, h2, weight, bias, lora_A, lora_B, grad_output, needs)
        if dh is not None:
            dh = dh.view(ctx.hidden_shape)
        return None, dh, dW, db, dA, dB


# ----------------------------------------------------------------------------------------------
# torch row functions: the CPU path, and the reference the Triton row kernels are tested against

def ce_rows_torch(x: torch.Tensor, labels: torch.Tensor, scale: torch.Tensor, *, ignore_index: int,
                  label_smoothing: float, softcap: float | None, compute_grad: bool) -> torch.Tensor:
    """Same contract as fastft.kernels.cross_entropy.ce_rows, in torch (fp32 inside)."""
    z = x.double() if x.dtype == torch.float64 else x.float()
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    # log-probs as log_softmax makes them: (z - max) - log Σ exp(z - max), not z - lse, which rounds at the ulp of
    # |max| (1e-3 at logits of 1e4)
    m = z.amax(dim=-1, keepdim=True).nan_to_num(0.0, 0.0, 0.0)  # an all -inf row: no shift (torch gives NaN too)
    zm = z - m
    log_d = torch.logsumexp(zm, dim=-1)
    ignored = labels == ignore_index
    safe = labels.masked_fill(ignored, 0)
    loss = log_d - zm.gather(1, safe[:, None])[:, 0]
    if label_smoothing > 0.0:
        loss = (1.0 - label_smoothing) * loss + label_smoothing * (log_d - zm.mean(dim=-1))
    loss = loss.masked_fill(ignored, 0.0)
    if compute_grad:
        grad = torch.exp(zm - log_d[:, None])
        grad.scatter_add_(1, safe[:, None], torch.full_like(log_d[:, None], -(1.0 - label_smoothing)))
        if label_smoothing > 0.0:
            grad -= label_smoothing / x.shape[1]
        if softcap is not None:
            grad *= 1.0 - (z / softcap) ** 2
        g = scale.expand(x.shape[0]).masked_fill(ignored, 0.0)
        x.copy_(grad * g[:, None])
    return loss


def kl_rows_torch(s: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None, scale: torch.Tensor, *,
                  ignore_index: int, temperature: float, reverse: bool, compute_grad: bool) -> torch.Tensor:
    """Same contract as fastft.kernels.cross_entropy.kl_rows, in torch (fp32 inside)."""
    up = torch.float64 if s.dtype == torch.float64 else torch.float32
    log_ps = F.log_softmax(s.to(up) / temperature, dim=-1)
    log_pt = F.log_softmax(t.to(up) / temperature, dim=-1)
    ps = log_ps.exp()
    if reverse:
        kl = (ps * (log_ps - log_pt)).sum(-1)
    else:
        pt = log_pt.exp()
        kl = (pt * (log_pt - log_ps)).sum(-1)
    ignored = labels == ignore_index if labels is not None else torch.zeros_like(kl, dtype=torch.bool)
    kl = kl.masked_fill(ignored, 0.0)
    if compute_grad:
        grad = ps * (log_ps - log_pt - kl[:, None]) if reverse else ps - pt
        g = (scale / temperature).expand(s.shape[0]).masked_fill(ignored, 0.0)
        s.copy_(grad * g[:, None])
    return kl
