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
NF4 weight as its inner tensors and fields, `nf4` / `nf4_ints` = fastft.ops.compiled_args.nf4_args, since a tensor
subclass cannot cross a custom op), the targets (flat labels; the teacher's rows and head for KL), grad_scale
(d loss / d row loss, a device tensor), the LoRA dropout seed (an int64 CPU tensor drawn by fastft::draw_seed before
the loss op, None without dropout: the ops are functions of their inputs, so activation checkpointing may recompute
them; see compiled_args), and Python options. Inside a body compiling() is False: the label range check (a host
sync) runs there unless a CUDA graph is being captured. CUDA graphs: with LoRA dropout > 0 the forward refuses to be
captured, forward and backward (compiled_args.seed_int: one mask would be replayed); a double-quantized NF4 head has its
nested scales decoded on the device while captured (compiled_args.nf4_from_args).
"""
from __future__ import annotations

import contextlib
import contextvars
import math
from typing import NamedTuple, Optional

import torch

from fastft.ops.chunked_logits import (Plan, RowLoss, as_rows, chunk_budget_bytes, chunk_rows, eager_losses,
                                       row_losses, row_losses_backward, scaled_grad, times_in_fp32,
                                       weight_grad_dtype)
from fastft.ops.compiled import capturing, needed, unused
from fastft.ops.compiled_args import nf4_args, nf4_from_args, seed_int, seeded_ops, traced_seed


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
    seed: Optional[torch.Tensor]
    op: str
    kind: str
    backend: str
    vocab: int
    ignore_index: int
    label_smoothing: float
    softcap: Optional[float]
    temperature: float
    scaling: float
    dropout_p: float
    nf4_ints: list
    chunk_size: Optional[int]
    bytes_per_logit: int
    weights: list  # RowLoss.weights (kind "distill"), [] otherwise

    @property
    def head(self) -> tuple:
        return self.hidden, self.weight, self.bias, self.lora_A, self.lora_B


N_ARGS = len(LossArgs._fields)
N_TENSOR_ARGS = LossArgs._fields.index("op")  # hidden .. seed (nf4 a list)
_NUMBER_LISTS = (LossArgs._fields.index("nf4_ints"), LossArgs._fields.index("weights"))


def list_lengths(a: LossArgs) -> tuple[int, int, int]:
    """What input_grads needs to know of a call's list arguments: len(nf4), len(nf4_ints), len(weights)."""
    return len(a.nf4), len(a.nf4_ints), len(a.weights)


def input_grads(head_grads, lengths: tuple[int, int, int], n_inputs: int) -> tuple:
    """A custom op backward's return, shaped like its inputs: the head's 5 gradients, a list for `nf4`, Nones; for
    the number lists `nf4_ints` and `weights` register_autograd wants [] when one is empty, else None."""
    n_nf4, *n_numbers = lengths
    grads = [*head_grads, [None] * n_nf4, *[None] * (n_inputs - 6)]
    for index, n in zip(_NUMBER_LISTS, n_numbers):
        grads[index] = None if n else []
    return tuple(grads)


_CHECKED_ON_HOST = contextvars.ContextVar("fastft_checked_on_host", default=False)


@contextlib.contextmanager
def checked_on_host():
    """Within it, the fused losses trust the caller to have checked on the host what they would read the device to
    check: every label in [0, vocab) or ignore_index (vocab: the smallest head involved), and a `num_items` tensor
    positive and finite. A device read per call less (a sync mid-forward): a trainer that builds its batches on the
    host keeps the device's queue full through the forward."""
    token = _CHECKED_ON_HOST.set(True)
    try:
        yield
    finally:
        _CHECKED_ON_HOST.reset(token)


def host_checked() -> bool:
    """Whether the call runs inside checked_on_host."""
    return _CHECKED_ON_HOST.get()


def check_label_range(op: str, labels2: torch.Tensor, vocab: int, ignore_index: int, name: str = "labels") -> None:
    """A label outside [0, vocab) (and not ignore_index) would read out of bounds: one host sync to refuse it
    (not inside checked_on_host)."""
    if host_checked():
        return
    bad = (labels2 != ignore_index) & ((labels2 < 0) | (labels2 >= vocab))
    if labels2.numel() and bool(bad.any()):
        first = labels2[bad][0].item()
        raise ValueError(f"{op}: `{name}` holds {first}, outside [0, {vocab}) and not ignore_index={ignore_index}")


def check_grad_scale(op: str, grad_scale: torch.Tensor) -> None:
    """1 / the mean's denominator, finite and positive: a `num_items` tensor of 0, a negative count or NaN (read
    here, in the traced op's body, as eager reads it while validating) would give inf, a flipped loss or NaN.
    Not inside checked_on_host."""
    if host_checked():
        return
    scale = float(grad_scale)
    if not (math.isfinite(scale) and scale > 0):
        held = 1 / scale if scale else float("inf")
        raise ValueError(f"{op}: `num_items` must be a positive number, got a tensor holding {held}")


def nf4_block_rows(hidden: torch.Tensor) -> int:
    """Vocab rows of an NF4 head dequantized at a time: a block of at most half a chunk's budget."""
    return max(1, chunk_budget_bytes(hidden.device) // (2 * hidden.shape[-1] * hidden.element_size()))


def _plan(a: LossArgs) -> Plan:
    row = RowLoss(a.kind, a.backend, a.ignore_index, a.label_smoothing, a.softcap, a.temperature,
                  tuple(a.weights))
    tokens = math.prod(a.hidden.shape[:-1])
    rows = a.chunk_size if a.chunk_size is not None else chunk_rows(tokens, a.vocab, a.bytes_per_logit,
                                                                     chunk_budget_bytes(a.hidden.device))
    # the NF4 container's dtype is never used: the chunks dequantize into the compute dtype they name
    return Plan(row, (a.labels, a.teacher_hidden, a.teacher_weight), rows, a.vocab,
                nf4=nf4_from_args(a.nf4, a.nf4_ints) if a.nf4 else None, nf4_rows=nf4_block_rows(a.hidden),
                scaling=a.scaling, dropout_p=a.dropout_p, seed=seed_int(a.op, a.seed, a.dropout_p, a.hidden.device),
                grad_scale=a.grad_scale)


def _forward_plan(a: LossArgs) -> Plan:
    """The checks a forward body does, then its plan."""
    device = a.hidden.device
    seed_int(a.op, a.seed, a.dropout_p, device)  # dropout inside a CUDA graph capture: refused before the checks
    if not capturing(device):
        if a.labels is not None:
            check_label_range(a.op, a.labels, a.vocab, a.ignore_index)
        check_grad_scale(a.op, a.grad_scale)
    return _plan(a)


# ----------------------------------------------------------------------------------------------
# fastft::linear_loss: the scalar loss, its gradients made in the forward

def _linear_loss_body(hidden: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                      lora_A: Optional[torch.Tensor], lora_B: Optional[torch.Tensor], nf4: list[torch.Tensor],
                      labels: Optional[torch.Tensor], teacher_hidden: Optional[torch.Tensor],
                      teacher_weight: Optional[torch.Tensor], grad_scale: torch.Tensor, seed: Optional[torch.Tensor],
                      op: str, kind: str, backend: str, vocab: int, ignore_index: int, label_smoothing: float,
                      softcap: Optional[float], temperature: float, scaling: float, dropout_p: float,
                      nf4_ints: list[int], chunk_size: Optional[int], bytes_per_logit: int, weights: list[float],
                      needs: list[bool]
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    a = LossArgs(hidden, weight, bias, lora_A, lora_B, nf4, labels, teacher_hidden, teacher_weight, grad_scale, seed,
                 op, kind, backend, vocab, ignore_index, label_smoothing, softcap, temperature, scaling,
                 dropout_p, nf4_ints, chunk_size, bytes_per_logit, weights)
    loss, grads, _ = eager_losses(_forward_plan(a), *a.head, tuple(needs))
    dh = grads.hidden.view(hidden.shape) if grads.hidden is not None else None
    return (loss, *[g if g is not None else unused(hidden) for g in (dh, *grads.as_tuple()[1:])])


def _linear_loss_fake(hidden, weight, bias, lora_A, lora_B, nf4, labels, teacher_hidden, teacher_weight, grad_scale,
                      seed, op, kind, backend, vocab, ignore_index, label_smoothing, softcap, temperature, scaling,
                      dropout_p, nf4_ints, chunk_size, bytes_per_logit, weights, needs):
    f32 = torch.float32
    acc = torch.float64 if hidden.dtype == torch.float64 else f32  # run_chunks' accumulators
    shapes = ((hidden.shape, hidden.dtype),
              (weight.shape, weight_grad_dtype(weight)) if weight is not None else None,
              ((vocab,), acc), (lora_A.shape if lora_A is not None else None, acc),
              (lora_B.shape if lora_B is not None else None, acc))
    grads = [hidden.new_empty(s[0], dtype=s[1]) if need else unused(hidden) for need, s in zip(needs, shapes)]
    return (hidden.new_empty((), dtype=f32), *grads)


def _linear_loss_setup(ctx, inputs, output):
    a, needs = LossArgs(*inputs[:N_ARGS]), inputs[N_ARGS]
    ctx.meta = [(t.shape, t.dtype) if need else None for need, t in zip(needs, a.head)]
    ctx.lengths = list_lengths(a)
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
    return input_grads(grads, ctx.lengths, N_ARGS + 1)


# fastft::linear_loss and fastft::linear_loss_dropout (a LoRA head with dropout): compiled_args.seeded_ops
LINEAR_LOSS_OPS = seeded_ops("linear_loss", _linear_loss_body, _linear_loss_fake, _linear_loss_backward,
                             _linear_loss_setup)
linear_loss_op = LINEAR_LOSS_OPS[False]


# ----------------------------------------------------------------------------------------------
# fastft::linear_row_losses and its backward: per-row losses, the chunks recomputed in backward

def _row_losses_body(hidden: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                     lora_A: Optional[torch.Tensor], lora_B: Optional[torch.Tensor], nf4: list[torch.Tensor],
                     labels: Optional[torch.Tensor], teacher_hidden: Optional[torch.Tensor],
                     teacher_weight: Optional[torch.Tensor], grad_scale: torch.Tensor, seed: Optional[torch.Tensor],
                     op: str, kind: str, backend: str, vocab: int, ignore_index: int, label_smoothing: float,
                     softcap: Optional[float], temperature: float, scaling: float, dropout_p: float,
                     nf4_ints: list[int], chunk_size: Optional[int], bytes_per_logit: int, weights: list[float],
                     dh_only: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-row losses, the unscaled dh in hidden's shape when dh_only)."""
    a = LossArgs(hidden, weight, bias, lora_A, lora_B, nf4, labels, teacher_hidden, teacher_weight, grad_scale, seed,
                 op, kind, backend, vocab, ignore_index, label_smoothing, softcap, temperature, scaling,
                 dropout_p, nf4_ints, chunk_size, bytes_per_logit, weights)
    losses, dh = row_losses(_forward_plan(a), as_rows(hidden), *a.head[1:], dh_only)
    return losses, (dh.view(hidden.shape) if dh_only else unused(hidden))


def _row_losses_fake(hidden, weight, bias, lora_A, lora_B, nf4, labels, teacher_hidden, teacher_weight, grad_scale,
                     seed, op, kind, backend, vocab, ignore_index, label_smoothing, softcap, temperature, scaling,
                     dropout_p, nf4_ints, chunk_size, bytes_per_logit, weights, dh_only):
    losses = hidden.new_empty((math.prod(hidden.shape[:-1]),), dtype=torch.float32)
    dh = hidden.new_empty(hidden.shape) if dh_only else unused(hidden)
    return losses, dh


def _row_losses_backward_body(hidden: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                              lora_A: Optional[torch.Tensor], lora_B: Optional[torch.Tensor], nf4: list[torch.Tensor],
                              labels: Optional[torch.Tensor], teacher_hidden: Optional[torch.Tensor],
                              teacher_weight: Optional[torch.Tensor], grad_scale: torch.Tensor,
                              seed: Optional[torch.Tensor], op: str, kind: str, backend: str, vocab: int,
                              ignore_index: int, label_smoothing: float, softcap: Optional[float], temperature: float,
                              scaling: float, dropout_p: float, nf4_ints: list[int], chunk_size: Optional[int],
                              bytes_per_logit: int, weights: list[float], grad_output: torch.Tensor, needs: list[bool]
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dh in hidden's shape, dW, db, dA, dB), each in its input's dtype; unused(hidden) where not in needs."""
    a = LossArgs(hidden, weight, bias, lora_A, lora_B, nf4, labels, teacher_hidden, teacher_weight, grad_scale, seed,
                 op, kind, backend, vocab, ignore_index, label_smoothing, softcap, temperature, scaling,
                 dropout_p, nf4_ints, chunk_size, bytes_per_logit, weights)
    grads = row_losses_backward(_plan(a), as_rows(hidden), *a.head[1:], grad_output, tuple(needs))
    dh = grads[0].view(hidden.shape) if grads[0] is not None else None
    return tuple(g if g is not None else unused(hidden) for g in (dh, *grads[1:]))


def _row_losses_backward_fake(hidden, weight, bias, lora_A, lora_B, nf4, labels, teacher_hidden, teacher_weight,
                              grad_scale, seed, op, kind, backend, vocab, ignore_index, label_smoothing, softcap,
                              temperature, scaling, dropout_p, nf4_ints, chunk_size, bytes_per_logit, weights,
                              grad_output, needs):
    return tuple(t.new_empty(t.shape) if need else unused(hidden)
                 for need, t in zip(needs, (hidden, weight, bias, lora_A, lora_B)))


# fastft::linear_row_losses_backward(_dropout): compiled_args.seeded_ops
ROW_LOSSES_BACKWARD_OPS = seeded_ops("linear_row_losses_backward", _row_losses_backward_body,
                                     _row_losses_backward_fake)


def _row_losses_setup(ctx, inputs, output):
    a, dh_only = LossArgs(*inputs[:N_ARGS]), inputs[N_ARGS]
    ctx.dh_only = dh_only
    ctx.dropout = a.dropout_p > 0.0
    ctx.options = a[N_TENSOR_ARGS:]  # op .. weights
    tensors = [t for t in a[:N_TENSOR_ARGS] if not isinstance(t, list)]  # all but nf4 (the seed among them)
    ctx.present = [t is not None for t in tensors]
    ctx.lengths = list_lengths(a)
    if dh_only:
        ctx.save_for_backward(output[1])
        return
    ctx.save_for_backward(*[t for t in tensors if t is not None], *a.nf4)


def _row_losses_backward(ctx, dlosses, _ddh):
    def grads_of_inputs(head_grads):
        return input_grads(head_grads, ctx.lengths, N_ARGS + 1)

    if ctx.dh_only:
        (dh,) = ctx.saved_tensors
        rows = as_rows(dh)
        dh = times_in_fp32(rows, dlosses.reshape(-1, 1).float(), dh.dtype).view(dh.shape)
        return grads_of_inputs((dh, None, None, None, None))
    saved = list(ctx.saved_tensors)
    n_rest = len(saved) - ctx.lengths[0]
    rest, nf4 = iter(saved[:n_rest]), saved[n_rest:]
    tensors = [next(rest) if present else None for present in ctx.present]
    needs = list(ctx.needs_input_grad[:5])
    if not any(needs):
        return grads_of_inputs((None,) * 5)
    head, targets = tensors[:5], tensors[5:]  # targets: labels .. seed
    grads = ROW_LOSSES_BACKWARD_OPS[ctx.dropout](*head, nf4, *targets, *ctx.options, dlosses, needs)
    return grads_of_inputs([needed(g, need) for g, need in zip(grads, needs)])


# fastft::linear_row_losses and fastft::linear_row_losses_dropout
ROW_LOSSES_OPS = seeded_ops("linear_row_losses", _row_losses_body, _row_losses_fake, _row_losses_backward,
                            _row_losses_setup)
row_losses_op, row_losses_backward_op = ROW_LOSSES_OPS[False], ROW_LOSSES_BACKWARD_OPS[False]


# ----------------------------------------------------------------------------------------------
# the entry linear_losses calls while compiling

def traced_loss(op: str, reduction: str, hidden, head, row: RowLoss, grad_scale, *, labels=None,
                teacher_hidden=None, teacher_weight=None, chunk_size=None, bytes_per_logit: int):
    """What EagerChunkedLoss / DeferredChunkedLoss.apply return, through the custom ops. head: a validated
    fastft.ops.lm_head.HeadArgs. Its dropout seed is drawn at run time by its own op (fastft::draw_seed), never
    here (it would be a graph constant), and passed in: the loss ops are functions of their inputs."""
    nf4, nf4_ints = nf4_args(head.nf4) if head.nf4 is not None else ([], [])
    seed = traced_seed(hidden, head.lora_A, head.dropout_p)
    args = LossArgs(hidden, head.weight, head.bias, head.lora_A, head.lora_B, nf4, labels, teacher_hidden,
                    teacher_weight, grad_scale, seed, op, row.kind, row.backend, head.vocab, row.ignore_index,
                    row.label_smoothing, row.softcap, row.temperature, float(head.scaling),
                    float(head.dropout_p), nf4_ints, chunk_size, bytes_per_logit, list(row.weights))
    grad, dropout = torch.is_grad_enabled(), float(head.dropout_p) > 0.0
    # the head's tensors named one by one: torch 2.10's dynamo cannot iterate a NamedTuple's property (args.head)
    needs = [grad and t is not None and t.requires_grad for t in (hidden, head.weight, head.bias, head.lora_A,
                                                                   head.lora_B)]
    if reduction == "none":
        losses, _ = ROW_LOSSES_OPS[dropout](*args, needs == [True, False, False, False, False])
        return losses
    return LINEAR_LOSS_OPS[dropout](*args, needs)[0]
