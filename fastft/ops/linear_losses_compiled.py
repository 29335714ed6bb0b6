"""The traced door of the fused linear losses (fastft.ops.compiled): the chunked loop of fastft.ops.chunked_logits
as custom ops, which linear_losses takes while torch.compile traces a call on the Triton backend.

- `fastft::linear_loss` (reductions "mean" / "sum"; EagerChunkedLoss's body): the scalar loss and, as extra
  outputs, the gradients the loop makes during the forward (memory as in eager: they are what backward hands out).
  Its backward only multiplies them by grad_output: plain torch ops, traced into the backward graph; out of place
  (a graph's saved output cannot be scaled in place as eager does), so backward holds one more dW-sized buffer
  for a moment, and it always multiplies (eager skips a grad_output of 1 after a host sync).
- `fastft::linear_row_losses` (reduction "none", log-probs, DPO; DeferredChunkedLoss's body) and
  `fastft::linear_row_losses_backward`: per-row losses; backward recomputes the chunks with row t's gradient
  scaled by g_t, or, when only dhidden is wanted, scales the rows of the dh the forward made.

What a call passes (`LossArgs`, the schema's order): the head's tensors (hidden, weight, bias, lora_A, lora_B; an
NF4 weight as its inner tensors, `nf4` = packed, absmax, code [, absmax2, code2, nested_offset], since a tensor
subclass cannot cross a custom op), the targets (flat labels; the teacher's rows and head for KL), grad_scale
(d loss / d row loss, a device tensor), and Python options. Inside a body compiling() is False: the label range
check (a host sync) runs there unless a CUDA graph is being captured, and the LoRA dropout seed is drawn there
(never in the traced wrapper, where it would be a constant) and returned for the recompute. CUDA graphs: with
LoRA dropout > 0 the forward refuses to be captured (one mask would be replayed); a double-quantized NF4 head
reads its nested offset on the host (as fastft::nf4_dequantize does), so it cannot be captured either.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch

from fastft.ops.chunked_logits import (Plan, RowLoss, as_rows, chunk_budget_bytes, chunk_rows, eager_losses,
                                       row_losses, row_losses_backward, scaled_grad, weight_grad_dtype)
from fastft.ops.compiled import capturing, needed, unused
from fastft.ops.shared import draw_seed
from fastft.quant.nf4_format import FLOAT_DTYPES
from fastft.quant.nf4_weight import NF4Weight


class LossArgs(NamedTuple):
    """The arguments every op of this file starts with, in schema order."""
    hidden: torch.Tensor
    weight: Optional[torch.Tensor]
    bias: Optional[torch.Tensor]
    lora_A: Optional[torch.Tensor]
    lora_B: Optional[torch.Tensor]
    nf4: list
    labels: Optional[torch.Tensor]
    teacher_hidden: Optional[torch.Tensor]
    teacher_weight: Optional[torch.Tensor]
    grad_scale: torch.Tensor
    op: str
    kind: str
    backend: str
    vocab: int
    ignore_index: int
    label_smoothing: float
    softcap: Optional[float]
    temperature: float
    reverse: bool
    scaling: float
    dropout_p: float
    nf4_blocksize: int
    nf4_nested_blocksize: int
    chunk_size: Optional[int]
    bytes_per_logit: int

    @property
    def head(self) -> tuple:
        return self.hidden, self.weight, self.bias, self.lora_A, self.lora_B


N_ARGS = len(LossArgs._fields)
N_TENSOR_ARGS = 10  # hidden .. grad_scale (nf4 a list)


def input_grads(head_grads, n_nf4: int, n_inputs: int) -> tuple:
    """A custom op backward's return, shaped like its inputs: the head's 5 gradients, a list for `nf4`, Nones."""
    return (*head_grads, [None] * n_nf4, *[None] * (n_inputs - 6))


def check_label_range(op: str, labels2: torch.Tensor, vocab: int, ignore_index: int) -> None:
    """A label outside [0, vocab) (and not ignore_index) would read out of bounds: one host sync to refuse it."""
    bad = (labels2 != ignore_index) & ((labels2 < 0) | (labels2 >= vocab))
    if labels2.numel() and bool(bad.any()):
        first = labels2[bad][0].item()
        raise ValueError(f"{op}: `labels` holds {first}, outside [0, {vocab}) and not ignore_index={ignore_index}")


def nf4_block_rows(hidden: torch.Tensor) -> int:
    """Vocab rows of an NF4 head dequantized at a time: a block of at most half a chunk's budget."""
    return max(1, chunk_budget_bytes(hidden.device) // (2 * hidden.shape[-1] * hidden.element_size()))


def nf4_parts(w: NF4Weight | None) -> tuple[list, int, int]:
    """An NF4 weight as a custom op takes it: (its inner tensors, blocksize, nested blocksize); ([], 0, 0) if None."""
    if w is None:
        return [], 0, 0
    parts = [w.packed, w.absmax, w.code]
    if w.absmax2 is not None:
        parts += [w.absmax2, w.code2, w.nested_offset]
    return parts, w.blocksize, w.nested_blocksize


def _nf4_weight(a: LossArgs) -> NF4Weight | None:
    if not a.nf4:
        return None
    packed, absmax, code = a.nf4[:3]
    nested = dict(absmax2=a.nf4[3], code2=a.nf4[4], offset=a.nf4[5]) if len(a.nf4) == 6 else {}
    # the container's dtype is never used: the chunks dequantize into the compute dtype they name
    dtype = a.hidden.dtype if a.hidden.dtype in FLOAT_DTYPES else torch.float32
    return NF4Weight(packed, absmax, (a.vocab, a.hidden.shape[-1]), dtype, a.nf4_blocksize, code=code,
                     nested_blocksize=a.nf4_nested_blocksize, **nested)


def _plan(a: LossArgs, seed: int) -> Plan:
    row = RowLoss(a.kind, a.backend, a.ignore_index, a.label_smoothing, a.softcap, a.temperature, a.reverse)
    tokens = math.prod(a.hidden.shape[:-1])
    rows = a.chunk_size if a.chunk_size is not None else chunk_rows(tokens, a.vocab, a.bytes_per_logit,
                                                                     chunk_budget_bytes(a.hidden.device))
    return Plan(row.row_fn(a.labels, a.teacher_hidden, a.teacher_weight), rows, a.vocab, nf4=_nf4_weight(a),
                nf4_rows=nf4_block_rows(a.hidden), scaling=a.scaling, dropout_p=a.dropout_p, seed=seed,
                grad_scale=a.grad_scale)


def _forward_plan(a: LossArgs) -> Plan:
    """The checks and the seed draw a forward body does, then its plan."""
    device = a.hidden.device
    if a.labels is not None and not capturing(device):
        check_label_range(a.op, a.labels, a.vocab, a.ignore_index)
    seed = 0
    if a.dropout_p > 0.0:
        if capturing(device):
            raise ValueError(f"{a.op}: LoRA dropout ({a.dropout_p}) on the lm_head under CUDA-graph capture would "
                             "replay one mask every step; set the head's lora_dropout to 0 or compile without "
                             "mode='reduce-overhead' (no CUDA-graph capture)")
        seed = draw_seed()
    return _plan(a, seed)


def _seed_tensor(seed: int) -> torch.Tensor:
    return torch.tensor([seed], dtype=torch.int64)


# ----------------------------------------------------------------------------------------------
# fastft::linear_loss: the scalar loss, its gradients made in the forward

@torch.library.custom_op("fastft::linear_loss", mutates_args=())
def linear_loss_op(hidden: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                   lora_A: Optional[torch.Tensor], lora_B: Optional[torch.Tensor], nf4: list[torch.Tensor],
                   labels: Optional[torch.Tensor], teacher_hidden: Optional[torch.Tensor],
                   teacher_weight: Optional[torch.Tensor], grad_scale: torch.Tensor, op: str, kind: str, backend: str,
                   vocab: int, ignore_index: int, label_smoothing: float, softcap: Optional[float], temperature: float,
                   reverse: bool, scaling: float, dropout_p: float, nf4_blocksize: int, nf4_nested_blocksize: int,
                   chunk_size: Optional[int], bytes_per_logit: int, needs: list[bool]
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    a = LossArgs(hidden, weight, bias, lora_A, lora_B, nf4, labels, teacher_hidden, teacher_weight, grad_scale, op,
                 kind, backend, vocab, ignore_index, label_smoothing, softcap, temperature, reverse, scaling,
                 dropout_p, nf4_blocksize, nf4_nested_blocksize, chunk_size, bytes_per_logit)
    loss, grads, _ = eager_losses(_forward_plan(a), *a.head, tuple(needs))
    dh = grads.hidden.view(hidden.shape) if grads.hidden is not None else None
    return (loss, *[g if g is not None else unused(hidden) for g in (dh, *grads.as_tuple()[1:])])


@linear_loss_op.register_fake
def _(hidden, weight, bias, lora_A, lora_B, nf4, labels, teacher_hidden, teacher_weight, grad_scale, op, kind,
      backend, vocab, ignore_index, label_smoothing, softcap, temperature, reverse, scaling, dropout_p, nf4_blocksize,
      nf4_nested_blocksize, chunk_size, bytes_per_logit, needs):
    f32 = torch.float32
    shapes = ((hidden.shape, hidden.dtype),
              (weight.shape, weight_grad_dtype(weight)) if weight is not None else None,
              ((vocab,), f32), (lora_A.shape if lora_A is not None else None, f32),
              (lora_B.shape if lora_B is not None else None, f32))
    grads = [hidden.new_empty(s[0], dtype=s[1]) if need else unused(hidden) for need, s in zip(needs, shapes)]
    return (hidden.new_empty((), dtype=f32), *grads)


def _linear_loss_setup(ctx, inputs, output):
    a, needs = LossArgs(*inputs[:N_ARGS]), inputs[N_ARGS]
    ctx.meta = [(t.shape, t.dtype) if need else None for need, t in zip(needs, a.head)]
    ctx.n_nf4 = len(a.nf4)
    ctx.post_scale = a.hidden.dtype == torch.float16  # eager_losses left fp16 gradients unscaled
    ctx.save_for_backward(a.grad_scale, *[g for need, g in zip(needs, output[1:]) if need])


def _linear_loss_backward(ctx, dloss, *_grads_of_grads):
    grad_scale, *saved = ctx.saved_tensors
    g = dloss.float().reshape(1)
    if ctx.post_scale:
        g = g * grad_scale
    saved = iter(saved)
    grads = [None if meta is None else scaled_grad(next(saved), g, meta[1], in_place=False).view(meta[0])
             for meta in ctx.meta]
    return input_grads(grads, ctx.n_nf4, N_ARGS + 1)


linear_loss_op.register_autograd(_linear_loss_backward, setup_context=_linear_loss_setup)


# ----------------------------------------------------------------------------------------------
# fastft::linear_row_losses and its backward: per-row losses, the chunks recomputed in backward

@torch.library.custom_op("fastft::linear_row_losses", mutates_args=())
def row_losses_op(hidden: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                  lora_A: Optional[torch.Tensor], lora_B: Optional[torch.Tensor], nf4: list[torch.Tensor],
                  labels: Optional[torch.Tensor], teacher_hidden: Optional[torch.Tensor],
                  teacher_weight: Optional[torch.Tensor], grad_scale: torch.Tensor, op: str, kind: str, backend: str,
                  vocab: int, ignore_index: int, label_smoothing: float, softcap: Optional[float], temperature: float,
                  reverse: bool, scaling: float, dropout_p: float, nf4_blocksize: int, nf4_nested_blocksize: int,
                  chunk_size: Optional[int], bytes_per_logit: int, dh_only: bool
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per-row losses, the unscaled dh in hidden's shape when dh_only, the dropout seed: int64 (1,) on the CPU)."""
    a = LossArgs(hidden, weight, bias, lora_A, lora_B, nf4, labels, teacher_hidden, teacher_weight, grad_scale, op,
                 kind, backend, vocab, ignore_index, label_smoothing, softcap, temperature, reverse, scaling,
                 dropout_p, nf4_blocksize, nf4_nested_blocksize, chunk_size, bytes_per_logit)
    plan = _forward_plan(a)
    losses, dh = row_losses(plan, as_rows(hidden), *a.head[1:], dh_only)
    return losses, (dh.view(hidden.shape) if dh_only else unused(hidden)), _seed_tensor(plan.seed)


@row_losses_op.register_fake
def _(hidden, weight, bias, lora_A, lora_B, nf4, labels, teacher_hidden, teacher_weight, grad_scale, op, kind,
      backend, vocab, ignore_index, label_smoothing, softcap, temperature, reverse, scaling, dropout_p, nf4_blocksize,
      nf4_nested_blocksize, chunk_size, bytes_per_logit, dh_only):
    losses = hidden.new_empty((math.prod(hidden.shape[:-1]),), dtype=torch.float32)
    dh = hidden.new_empty(hidden.shape) if dh_only else unused(hidden)
    return losses, dh, torch.empty(1, dtype=torch.int64, device="cpu")


@torch.library.custom_op("fastft::linear_row_losses_backward", mutates_args=())
def row_losses_backward_op(hidden: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                           lora_A: Optional[torch.Tensor], lora_B: Optional[torch.Tensor], nf4: list[torch.Tensor],
                           labels: Optional[torch.Tensor], teacher_hidden: Optional[torch.Tensor],
                           teacher_weight: Optional[torch.Tensor], grad_scale: torch.Tensor, op: str, kind: str,
                           backend: str, vocab: int, ignore_index: int, label_smoothing: float,
                           softcap: Optional[float], temperature: float, reverse: bool, scaling: float,
                           dropout_p: float, nf4_blocksize: int, nf4_nested_blocksize: int, chunk_size: Optional[int],
                           bytes_per_logit: int, grad_output: torch.Tensor, seed: torch.Tensor, needs: list[bool]
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dh in hidden's shape, dW, db, dA, dB), each in its input's dtype; unused(hidden) where not in needs."""
    a = LossArgs(hidden, weight, bias, lora_A, lora_B, nf4, labels, teacher_hidden, teacher_weight, grad_scale, op,
                 kind, backend, vocab, ignore_index, label_smoothing, softcap, temperature, reverse, scaling,
                 dropout_p, nf4_blocksize, nf4_nested_blocksize, chunk_size, bytes_per_logit)
    grads = row_losses_backward(_plan(a, int(seed.item())), as_rows(hidden), *a.head[1:], grad_output, tuple(needs))
    dh = grads[0].view(hidden.shape) if grads[0] is not None else None
    return tuple(g if g is not None else unused(hidden) for g in (dh, *grads[1:]))


@row_losses_backward_op.register_fake
def _(hidden, weight, bias, lora_A, lora_B, nf4, labels, teacher_hidden, teacher_weight, grad_scale, op, kind,
      backend, vocab, ignore_index, label_smoothing, softcap, temperature, reverse, scaling, dropout_p, nf4_blocksize,
      nf4_nested_blocksize, chunk_size, bytes_per_logit, grad_output, seed, needs):
    return tuple(t.new_empty(t.shape) if need else unused(hidden)
                 for need, t in zip(needs, (hidden, weight, bias, lora_A, lora_B)))


def _row_losses_setup(ctx, inputs, output):
    a, dh_only = LossArgs(*inputs[:N_ARGS]), inputs[N_ARGS]
    ctx.dh_only = dh_only
    ctx.options = a[N_TENSOR_ARGS:]  # op .. bytes_per_logit
    tensors = [t for t in a[:N_TENSOR_ARGS] if not isinstance(t, list)]  # all but nf4
    ctx.present = [t is not None for t in tensors]
    ctx.n_nf4 = len(a.nf4)
    if dh_only:
        ctx.save_for_backward(output[1])
        return
    ctx.save_for_backward(*[t for t in tensors if t is not None], *a.nf4, output[2])


def _row_losses_backward(ctx, dlosses, _ddh, _dseed):
    if ctx.dh_only:
        (dh,) = ctx.saved_tensors
        rows = dh.reshape(-1, dh.shape[-1])
        return input_grads(((rows * dlosses.reshape(-1, 1).to(dh.dtype)).view(dh.shape), None, None, None, None),
                           ctx.n_nf4, N_ARGS + 1)
    saved = list(ctx.saved_tensors)
    seed, nf4 = saved[-1], saved[len(saved) - 1 - ctx.n_nf4: -1]
    rest = iter(saved[: len(saved) - 1 - ctx.n_nf4])
    tensors = [next(rest) if present else None for present in ctx.present]
    needs = list(ctx.needs_input_grad[:5])
    if not any(needs):
        return input_grads((None,) * 5, ctx.n_nf4, N_ARGS + 1)
    head, targets = tensors[:5], tensors[5:]
    grads = row_losses_backward_op(*head, nf4, *targets, *ctx.options, dlosses, seed, needs)
    return input_grads([needed(g, need) for g, need in zip(grads, needs)], ctx.n_nf4, N_ARGS + 1)


row_losses_op.register_autograd(_row_losses_backward, setup_context=_row_losses_setup)


# ----------------------------------------------------------------------------------------------
# the entry linear_losses calls while compiling

def traced_loss(op: str, reduction: str, hidden, head, row: RowLoss, grad_scale, *, labels=None,
                teacher_hidden=None, teacher_weight=None, chunk_size=None, bytes_per_logit: int):
    """What EagerChunkedLoss / DeferredChunkedLoss.apply return, through the custom ops. head: a validated
    fastft.ops.lm_head.HeadArgs (its dropout seed is drawn inside the op)."""
    nf4, blocksize, nested_blocksize = nf4_parts(head.nf4)
    args = LossArgs(hidden, head.weight, head.bias, head.lora_A, head.lora_B, nf4, labels, teacher_hidden,
                    teacher_weight, grad_scale, op, row.kind, row.backend, head.vocab, row.ignore_index,
                    row.label_smoothing, row.softcap, row.temperature, row.reverse, float(head.scaling),
                    float(head.dropout_p), blocksize, nested_blocksize, chunk_size, bytes_per_logit)
    grad = torch.is_grad_enabled()
    needs = [grad and t is not None and t.requires_grad for t in args.head]
    if reduction == "none":
        losses, _, _ = row_losses_op(*args, needs == [True, False, False, False, False])
        return losses
    return linear_loss_op(*args, needs)[0]
