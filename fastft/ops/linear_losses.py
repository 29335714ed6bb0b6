"""Fused linear losses: an lm_head GEMM and its loss without the (tokens × vocab) logits tensor.

`linear_cross_entropy(hidden, weight, labels)` equals `F.cross_entropy(F.linear(hidden, weight).float(),
labels)` (with optional bias, ignore_index, label_smoothing, Gemma-2 softcap, reduction and an outside token
count `num_items`), but works one chunk of token rows at a time (fastft.ops.chunked_logits): the logits of a
chunk go into one reused buffer, a row kernel (fastft.kernels.cross_entropy) turns them into losses and
overwrites them with dloss/dlogits, and the hidden / weight / bias (/ LoRA) gradients are made right there,
during the forward. Backward only scales them by grad_output. The same loop serves `lm_head_cross_entropy`
(an nn.Linear, an NF4 or a LoRA lm_head module), `linear_kl_div` (distillation), `linear_sequence_logprobs`
and `linear_dpo_loss`.

Cost at T tokens, hidden H, vocab V (mean/sum reductions, trainable W):
- FLOPs: three GEMMs of 2·T·V·H each (logits, dh = dlogits·W, dW = dlogitsᵀ·h): the floor. At 8192 × 4096
  × 128256 that is 25.8 TFLOP, ~34 ms at an H200's 757 TFLOP/s. A frozen W (LoRA fine-tuning) skips dW.
- Bytes beyond the GEMMs' own: the row kernel reads each logits chunk twice and writes it once (3·T·V·2 B in
  bf16: 6.3 GB, ~1.5 ms at 4.3 TB/s); dW in W's dtype is read and written once per chunk (2·V·H·2 B each:
  the reason chunks are not small). reduction="none" and log-probs recompute the logits in backward: one
  more GEMM.
- Memory: one (rows × V) chunk in the compute dtype (FASTFT_LOSS_CHUNK_MIB, default 96 MiB on a GPU:
  384 rows at V = 128256 in bf16; 32 MiB on the CPU, where the torch row functions' fp32 temporaries count
  in it), the outputs (dh; dW in W's dtype, fp32 when that is small), nothing of size T × V. Chunk size
  trades memory for dW traffic: at 384 rows the dW GEMM (K = 384) sits near the H200's ridge point.

Under torch.compile a Triton-backend call traces as one custom op (fastft.ops.linear_losses_compiled; the convention
is fastft.ops.compiled's); eager keeps the autograd Functions of fastft.ops.chunked_logits.

Semantics (documented differences from torch): the loss is fp32 for every input dtype; "mean" over zero
counted tokens (all labels ignored) is 0 with zero gradients, not NaN; reduction "none" returns fp32 per-token
losses (0 at ignored tokens) and backward honours a per-token grad_output (by recomputing the logits, or,
when only dhidden is wanted, by scaling the rows of a dhidden made in the forward). Every returned loss may be
changed in place (`loss *= w`, as transformers.Trainer does): none is a view of an autograd Function's output.
Gradients made in the forward are handed out by the first backward: a second backward through the same graph is
refused. In fp16, chunk gradients stay unscaled until backward (1/N would flush them below fp16's range before a
loss scaler's factor arrives); in bf16/fp32 the reduction's 1/N is applied inside the row kernel.
"""
from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F

from fastft.ops import shared
from fastft.ops.chunked_logits import (DeferredChunkedLoss, EagerChunkedLoss, Plan, RowLoss, as_rows,
                                       chunk_budget_bytes, chunk_rows)
from fastft.ops.compiled import capturing, compiling
from fastft.ops.compiled_args import refuse_replayed_dropout
from fastft.ops.linear_losses_compiled import (check_label_range, checked_on_host,  # noqa: F401 - public here
                                              host_checked, nf4_block_rows, traced_loss)
from fastft.ops.lm_head import HeadArgs, head_of_module
from fastft.ops.shared import (BACKENDS, autocast_enabled, autocast_inputs, autocast_off, check, compute_input, finite,
                               hook_device, resolve_backend)

REDUCTIONS = ("mean", "sum", "none")
DIRECTIONS = ("forward", "reverse")


def _check_tensor(op: str, name: str, t, *, floating: bool = True) -> None:
    # a ValueError, as every op's argument checks raise (fastft.ops.shared.check_tensor)
    check(isinstance(t, torch.Tensor), lambda: f"{op}: `{name}` must be a torch.Tensor, got {type(t).__name__}")
    if floating:
        check(t.is_floating_point(), lambda: f"{op}: `{name}` must be a floating-point tensor, got {t.dtype}")


def _number(x) -> bool:
    """A real number, not a bool (True would pass as 1.0)."""
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _check_labels(op: str, name: str, labels, hidden: torch.Tensor, vocab: int, ignore_index: int,
                  hidden_name: str = "hidden") -> torch.Tensor:
    _check_tensor(op, name, labels, floating=False)
    check(labels.dtype in (torch.int64, torch.int32),
           lambda: f"{op}: `{name}` must be int64 (or int32), got {labels.dtype}")
    check(tuple(labels.shape) == tuple(hidden.shape[:-1]),
           lambda: f"{op}: `{name}` has shape {tuple(labels.shape)} but `{hidden_name}` {tuple(hidden.shape)} needs "
           f"{tuple(hidden.shape[:-1])} (one label per row)")
    check(labels.device == hidden.device,
           lambda: f"{op}: `{name}` is on {labels.device} but `{hidden_name}` on {hidden.device}")
    labels2 = labels.reshape(-1)
    labels2 = (labels2 if labels2.dtype == torch.int64 else labels2.to(torch.int64)).contiguous()
    # one device sync; while torch.compile traces it would break the graph (the custom op's body checks instead),
    # and a CUDA graph being captured cannot sync; meta labels have no values to check
    if not compiling() and not capturing(labels2.device) and not labels2.is_meta:
        check_label_range(op, labels2, vocab, ignore_index)
    return labels2


def _check_options(op: str, reduction: str, ignore_index, num_items, backend: str) -> None:
    check(reduction in REDUCTIONS, lambda: f"{op}: `reduction` must be one of {REDUCTIONS}, got {reduction!r}")
    check(isinstance(ignore_index, numbers.Integral) and not isinstance(ignore_index, bool),
           lambda: f"{op}: `ignore_index` must be an int, got {ignore_index!r}")
    check(backend in BACKENDS, lambda: f"{op}: `backend` must be one of {BACKENDS}, got {backend!r}")
    if num_items is None:
        return
    check(reduction == "mean",
           lambda: f"{op}: `num_items` is the denominator of reduction='mean'; got reduction={reduction!r}")
    if isinstance(num_items, torch.Tensor):
        check(num_items.numel() == 1 and not num_items.dtype == torch.bool,
               lambda: f"{op}: `num_items` must be a number or a one-element tensor, got shape "
                       f"{tuple(num_items.shape)}")
        # its value too (a 0 would give inf, a negative count a flipped loss), where a read is allowed: as the
        # label range check, not while torch.compile traces or a CUDA graph is captured
        if not compiling() and not capturing(num_items.device) and not host_checked():
            value = float(num_items)
            check(value > 0 and math.isfinite(value), lambda: f"{op}: `num_items` must be a positive number, got "
                                                              f"a tensor holding {value}")
    else:
        check(_number(num_items) and num_items > 0
               and finite(num_items), lambda: f"{op}: `num_items` must be a positive number, got {num_items!r}")


def _grad_scale(reduction: str, labels2: torch.Tensor | None, ignore_index: int, tokens: int, num_items,
                device) -> torch.Tensor:
    """fp32 (1,) d(loss)/d(row loss): 1 for "sum", 1/denominator for "mean" (num_items, else the counted rows,
    at least 1). Stays on the device: no sync."""
    if reduction == "sum":
        return torch.ones(1, dtype=torch.float32, device=device)
    if isinstance(num_items, torch.Tensor):
        denom = num_items.to(device=device, dtype=torch.float32).reshape(1)
    elif num_items is not None:  # full, not as_tensor: traced, as_tensor guarded on the value (a graph per count)
        denom = torch.full((1,), num_items, dtype=torch.float32, device=device)
    elif labels2 is not None:
        denom = (labels2 != ignore_index).sum().float().clamp(min=1.0).reshape(1)
    else:
        denom = torch.full((1,), float(max(tokens, 1)), dtype=torch.float32, device=device)
    return denom.reciprocal()  # = 1.0 / denom (Tensor.__rdiv__ is reciprocal() * 1.0), one device op fewer


def _logit_bytes(backend: str, dtype: torch.dtype, buffers: int = 1, temporaries: int = 12) -> int:
    """Bytes per logit a chunk row costs: the buffer(s), plus the torch row functions' fp32 temporaries alive at
    once (measured peaks: plain cross-entropy 12, with softcap or label smoothing 20, KL 24)."""
    return buffers * dtype.itemsize + (temporaries if backend == "torch" else 0)


def _run(op: str, reduction: str, hidden, head: HeadArgs, row: RowLoss, grad_scale, *, labels2=None,
         teacher_h2=None, teacher_w=None, chunk_size, bytes_per_logit: int):
    """The chunked loop through one of its two doors (fastft.ops.compiled): the autograd Functions, or while
    torch.compile traces, the custom ops (fastft.ops.linear_losses_compiled), on either backend: traced, the torch
    backend's chunk loop specialised every graph on the token count (a recompile per packed batch length, until
    dynamo's recompile limit sent the step back to eager) and its LoRA-head dropout broke the graph."""
    with autocast_off(hidden.device.type):
        if compiling():
            return traced_loss(op, reduction, hidden, head, row, grad_scale, labels=labels2, teacher_hidden=teacher_h2,
                               teacher_weight=teacher_w, chunk_size=chunk_size, bytes_per_logit=bytes_per_logit)
        refuse_replayed_dropout(op, head.dropout_p, hidden.device)  # the seed is drawn on the host below
        tokens = math.prod(hidden.shape[:-1])
        rows = chunk_size if chunk_size is not None else chunk_rows(tokens, head.vocab, bytes_per_logit,
                                                                    chunk_budget_bytes(hidden.device))
        nf4_rows = nf4_block_rows(hidden) if head.nf4 is not None else Plan.nf4_rows  # (unused without NF4)
        plan = Plan(row, (labels2, teacher_h2, teacher_w), rows, head.vocab, nf4=head.nf4, nf4_rows=nf4_rows,
                    scaling=head.scaling, dropout_p=head.dropout_p,
                    seed=shared.draw_seed() if head.dropout_p > 0.0 else 0, grad_scale=grad_scale)
        plan.extra["grad_enabled"] = torch.is_grad_enabled()
        if reduction == "none":
            return DeferredChunkedLoss.apply(plan, hidden, head.weight, head.bias, head.lora_A, head.lora_B)
        return EagerChunkedLoss.apply(plan, hidden, head.weight, head.bias, head.lora_A, head.lora_B)


def _autocast(hidden: torch.Tensor, head: HeadArgs) -> tuple[torch.Tensor, HeadArgs]:
    """hidden and the head's dense weight and bias cast as torch.autocast casts a linear's (fp64 stays fp64)."""
    if not (isinstance(hidden, torch.Tensor) and autocast_enabled(hidden.device.type)):
        return hidden, head
    hidden, weight, bias = autocast_inputs(hidden, head.weight, head.bias)
    return hidden, HeadArgs(weight, head.nf4, bias, head.lora_A, head.lora_B, head.scaling, head.dropout_p)


def _head_cross_entropy(op: str, hidden, head: HeadArgs, labels, *, ignore_index, reduction, label_smoothing,
                        softcap, num_items, backend, chunk_size):
    _check_tensor(op, "hidden", hidden)
    _check_options(op, reduction, ignore_index, num_items, backend)
    check(_number(label_smoothing) and 0.0 <= label_smoothing <= 1.0,
           lambda: f"{op}: `label_smoothing` must be in [0, 1], got {label_smoothing!r}")
    check(softcap is None or (_number(softcap) and softcap > 0
                              and finite(softcap)),
           lambda: f"{op}: `softcap` must be None or a positive finite number (not a bool), got {softcap!r}")
    hidden, head = _autocast(hidden, head)
    if head.nf4 is not None:  # as an NF4 layer computes (an fp32 input on bf16 weights in bf16)
        hidden = compute_input(hidden, head.nf4)
    head.validate(op, hidden)
    labels2 = _check_labels(op, "labels", labels, hidden, head.vocab, int(ignore_index))
    backend = resolve_backend(op, backend, hidden.device, arg="hidden", dtype=hidden.dtype)
    ignore_index, label_smoothing = int(ignore_index), float(label_smoothing)
    softcap = None if softcap is None else float(softcap)
    _check_chunk_size(op, chunk_size)
    row = RowLoss("ce", backend, ignore_index, label_smoothing=label_smoothing, softcap=softcap)
    grad_scale = _grad_scale(reduction, labels2, ignore_index, labels2.numel(), num_items, hidden.device)
    loss = _run(op, reduction, hidden, head, row, grad_scale, labels2=labels2,
                chunk_size=None if chunk_size is None else int(chunk_size),
                bytes_per_logit=_logit_bytes(backend, hidden.dtype,
                                             temporaries=20 if softcap is not None or label_smoothing else 12))
    return loss.view(labels.shape) if reduction == "none" else loss


def _check_chunk_size(op: str, chunk_size) -> None:
    if chunk_size is not None:
        check(isinstance(chunk_size, numbers.Integral) and not isinstance(chunk_size, bool) and chunk_size > 0,
               lambda: f"{op}: `chunk_size` must be a positive int (token rows per chunk), got {chunk_size!r}")


def linear_cross_entropy(hidden, weight, labels, *, bias=None, ignore_index=-100, reduction="mean",
                         label_smoothing=0.0, softcap=None, num_items=None, backend="auto", chunk_size=None):
    """Cross-entropy of logits = hidden·weightᵀ + bias against labels, without materialising the logits.

    hidden (..., H) fp32/fp16/bf16; weight (V, H) in hidden's dtype (or under torch.autocast); labels (...) int64
    with ignore_index marking rows that do not count. softcap c: logits → c·tanh(logits/c) first (Gemma 2).
    label_smoothing as torch's F.cross_entropy. reduction "mean" divides by `num_items` when given (a number
    or a one-element tensor: the token count of the whole accumulated batch, for exact gradient
    accumulation), else by the count of non-ignored labels. Returns an fp32 loss (per-row fp32 losses of
    labels' shape for "none"). backend "auto" (Triton row kernel on CUDA, torch elsewhere) | "triton" |
    "torch"; chunk_size: token rows per chunk (default from FASTFT_LOSS_CHUNK_MIB).
    """
    op = "linear_cross_entropy"
    _check_tensor(op, "weight", weight)
    return _head_cross_entropy(op, hidden, HeadArgs(weight=weight, bias=bias), labels, ignore_index=ignore_index,
                               reduction=reduction, label_smoothing=label_smoothing, softcap=softcap,
                               num_items=num_items, backend=backend, chunk_size=chunk_size)


def lm_head_cross_entropy(hidden, lm_head, labels, *, ignore_index=-100, reduction="mean", label_smoothing=0.0,
                          softcap=None, num_items=None, backend="auto"):
    """linear_cross_entropy through an lm_head module: nn.Linear, fastft's NF4Linear (its weight dequantized
    a vocab block at a time), or a peft LoRA Linear over either (fastft's FusedLoraLinear / FusedQLoraLinear or
    peft's own). A LoRA head's adapters get their gradients; LoRA dropout in training mode is honoured (with
    fastft's own mask draw). Refused with a clear error: DoRA and other LoRA variants, lora_bias,
    fan_in_fan_out, other base layers. Backend as linear_cross_entropy's; chunking by its default budget.
    An NF4 head is dequantized twice per token chunk (for the logits and for dh), a block of vocab rows of at
    most half the chunk budget at a time: never the whole weight in the compute dtype."""
    head = head_of_module("lm_head_cross_entropy", lm_head)
    device = hook_device(lm_head)
    if device is not None and isinstance(hidden, torch.Tensor) and hidden.device != device:
        # accelerate's device_map hook would move the head's input to its device (the last layers and the head may
        # sit on different GPUs); the loss runs there, as the model's own would
        hidden = hidden.to(device)
        labels = labels.to(device) if isinstance(labels, torch.Tensor) else labels
    return _head_cross_entropy("lm_head_cross_entropy", hidden, head, labels, ignore_index=ignore_index,
                               reduction=reduction, label_smoothing=label_smoothing, softcap=softcap,
                               num_items=num_items, backend=backend, chunk_size=None)


def linear_kl_div(student_hidden, student_weight, teacher_hidden, teacher_weight, *, temperature=1.0,
                  direction="forward", labels=None, ignore_index=-100, reduction="mean", num_items=None,
                  backend="auto", chunk_size=None):
    """KL divergence between the student's and the teacher's next-token distributions at `temperature`,
    from hidden states and heads, chunked like linear_cross_entropy (no logits tensor for either side).

    p_s = softmax(h_s·W_sᵀ/τ), p_t = softmax(h_t·W_tᵀ/τ); direction "forward": KL(p_t‖p_s) (teacher-weighted,
    the usual distillation loss), "reverse": KL(p_s‖p_t). Summed over the vocab, per row; rows whose `labels`
    equal ignore_index do not count; "mean" divides by num_items, else the counted rows. No τ² factor (multiply
    the result for Hinton-style scaling). The teacher side gets no gradient. Shapes: student_hidden (..., Hs),
    student_weight (V, Hs), teacher_hidden (..., Ht) with the same leading shape, teacher_weight (V, Ht).
    """
    op = "linear_kl_div"
    check(direction in DIRECTIONS, lambda: f"{op}: `direction` must be one of {DIRECTIONS}, got {direction!r}")
    row = dict(kind="distill", weights=(0.0, 1.0, 0.0) if direction == "reverse" else (1.0, 0.0, 0.0))
    return _teacher_loss(op, row, student_hidden, student_weight, teacher_hidden, teacher_weight, labels,
                         temperature, ignore_index, reduction, num_items, backend, chunk_size)


def linear_distill_loss(student_hidden, student_weight, teacher_hidden, teacher_weight, labels=None, *,
                        kl_weight=1.0, reverse_kl_weight=0.0, ce_weight=0.0, temperature=1.0, ignore_index=-100,
                        reduction="mean", num_items=None, backend="auto", chunk_size=None):
    """Per row kl_weight·KL(p_t‖p_s) + reverse_kl_weight·KL(p_s‖p_t) + ce_weight·CE(h_s·W_sᵀ, labels), in one
    chunked pass: each chunk's student and teacher logits are made once, and their gradient goes through the head
    once, for all the terms (a linear_kl_div / linear_cross_entropy call per term makes and differentiates them
    per term: 4 of the 2·T·V·H GEMMs instead of 3 per term with a trainable head, and one dh and dW).

    KL at `temperature` without τ² (fold it into the weights), CE at temperature 1 over the same vocabulary
    (student_weight's rows); weights ≥ 0, at least one positive; CE needs `labels`. Reductions, ignore_index,
    num_items and shapes as linear_kl_div.
    """
    op = "linear_distill_loss"
    weights = (kl_weight, reverse_kl_weight, ce_weight)
    for name, w in zip(("kl_weight", "reverse_kl_weight", "ce_weight"), weights):
        check(_number(w) and w >= 0 and finite(w),
              lambda: f"{op}: `{name}` must be a number ≥ 0, got {w!r}")
    check(any(weights), lambda: f"{op}: every weight is 0: set kl_weight, reverse_kl_weight or ce_weight")
    check(labels is not None or not ce_weight, lambda: f"{op}: ce_weight={ce_weight} needs `labels`")
    # the weights relative to the largest go into the chunks, the largest multiplies the fp32 result: in fp16 the
    # chunk gradients stay unscaled until backward (underflow), and a small weight folded in would sink them again
    top = float(max(weights))
    row = dict(kind="distill", weights=tuple(float(w) / top for w in weights))
    loss = _teacher_loss(op, row, student_hidden, student_weight, teacher_hidden, teacher_weight, labels,
                         temperature, ignore_index, reduction, num_items, backend, chunk_size)
    return loss if top == 1.0 else loss * top


def _teacher_loss(op, row_options, student_hidden, student_weight, teacher_hidden, teacher_weight, labels,
                  temperature, ignore_index, reduction, num_items, backend, chunk_size):
    """linear_kl_div's and linear_distill_loss's checks and call."""
    for name, t in (("student_hidden", student_hidden), ("student_weight", student_weight),
                    ("teacher_hidden", teacher_hidden), ("teacher_weight", teacher_weight)):
        _check_tensor(op, name, t)
    _check_options(op, reduction, ignore_index, num_items, backend)
    check(_number(temperature) and temperature > 0 and finite(temperature),
           lambda: f"{op}: `temperature` must be a positive number, got {temperature!r}")
    head = HeadArgs(weight=student_weight)
    student_hidden, head = _autocast(student_hidden, head)
    teacher_hidden, teacher = _autocast(teacher_hidden, HeadArgs(weight=teacher_weight))
    head.validate(op, student_hidden, hidden_name="student_hidden", weight_name="student_weight")
    teacher.validate(op, teacher_hidden, hidden_name="teacher_hidden", weight_name="teacher_weight")
    check(teacher.vocab == head.vocab, lambda: f"{op}: `teacher_weight` has {teacher.vocab} rows but `student_weight` "
                                        f"{head.vocab}: student and teacher need one vocabulary")
    check(tuple(teacher_hidden.shape[:-1]) == tuple(student_hidden.shape[:-1]),
           lambda: f"{op}: `teacher_hidden` {tuple(teacher_hidden.shape)} and `student_hidden` "
           f"{tuple(student_hidden.shape)} need the same leading shape (one row each per token)")
    ignore_index = int(ignore_index)
    labels2 = None
    if labels is not None:
        labels2 = _check_labels(op, "labels", labels, student_hidden, head.vocab, ignore_index, "student_hidden")
    backend = resolve_backend(op, backend, student_hidden.device, arg="student_hidden", dtype=student_hidden.dtype)
    _check_chunk_size(op, chunk_size)
    T = math.prod(student_hidden.shape[:-1])
    th2 = as_rows(teacher_hidden.detach())
    row = RowLoss(backend=backend, ignore_index=ignore_index, temperature=float(temperature), **row_options)
    grad_scale = _grad_scale(reduction, labels2, ignore_index, T, num_items, student_hidden.device)
    loss = _run(op, reduction, student_hidden, head, row, grad_scale, labels2=labels2, teacher_h2=th2,
                teacher_w=teacher.weight.detach(), chunk_size=None if chunk_size is None else int(chunk_size),
                bytes_per_logit=_distill_logit_bytes(backend, student_hidden.dtype, row.weights))
    return loss.view(student_hidden.shape[:-1]) if reduction == "none" else loss


def _distill_logit_bytes(backend: str, dtype: torch.dtype, weights: tuple[float, ...]) -> int:
    """_logit_bytes of a "distill" row: the student's chunk, the teacher's where a KL term is weighted, and the
    copies weighted_rows keeps for every term but the last (at most 2)."""
    teacher = bool(weights[0] or weights[1])
    copies = min(sum(1 for w in weights if w) - 1, 2)
    return _logit_bytes(backend, dtype, buffers=1 + teacher + copies, temporaries=24 if teacher else 12)


def linear_sequence_logprobs(hidden, weight, labels, *, bias=None, ignore_index=-100, softcap=None,
                             backend="auto", chunk_size=None):
    """Σ over the last dimension of log p(label) under logits = hidden·weightᵀ + bias: hidden (B, S, H),
    labels (B, S) → (B,) fp32 (ignored positions add 0). Differentiable (the logits are recomputed in backward);
    under torch.no_grad it is the reference pass of DPO (one GEMM, nothing kept)."""
    op = "linear_sequence_logprobs"
    _check_tensor(op, "hidden", hidden)
    check(hidden.dim() >= 2, lambda: f"{op}: `hidden` must be (..., S, H), got shape {tuple(hidden.shape)}")
    _check_tensor(op, "weight", weight)
    token_losses = _head_cross_entropy(op, hidden, HeadArgs(weight=weight, bias=bias), labels,
                                       ignore_index=ignore_index, reduction="none", label_smoothing=0.0,
                                       softcap=softcap, num_items=None, backend=backend, chunk_size=chunk_size)
    return -token_losses.sum(-1)


def linear_dpo_loss(policy_chosen_hidden, policy_rejected_hidden, weight, chosen_labels, rejected_labels, *,
                    ref_chosen_logps, ref_rejected_logps, beta=0.1, ignore_index=-100, bias=None, backend="auto"):
    """DPO (sigmoid loss) from the policy's hidden states and head: returns (loss, chosen_rewards,
    rejected_rewards) with loss = -mean log σ(β·((π_c - ref_c) - (π_r - ref_r))) (0 for a batch of no pairs, as a
    mean over nothing is for the other losses), rewards β·(π - ref) (detached,
    per sequence). π_c, π_r are per-sequence summed log-probs (linear_sequence_logprobs) of chosen_labels /
    rejected_labels; ref_* are the caller's (B,) reference log-probs, e.g. linear_sequence_logprobs of the
    reference model under torch.no_grad. Chosen and rejected rows go through one chunked pass; backend as
    linear_cross_entropy's."""
    op = "linear_dpo_loss"
    for name, t in (("policy_chosen_hidden", policy_chosen_hidden), ("policy_rejected_hidden", policy_rejected_hidden),
                    ("weight", weight), ("ref_chosen_logps", ref_chosen_logps),
                    ("ref_rejected_logps", ref_rejected_logps)):
        _check_tensor(op, name, t)
    for name, h in (("policy_chosen_hidden", policy_chosen_hidden), ("policy_rejected_hidden", policy_rejected_hidden)):
        check(h.dim() == 3, lambda: f"{op}: `{name}` must be (B, S, H), got shape {tuple(h.shape)}")
    B = policy_chosen_hidden.shape[0]
    check(policy_rejected_hidden.shape[0] == B and policy_rejected_hidden.shape[-1] == policy_chosen_hidden.shape[-1],
           lambda: f"{op}: `policy_rejected_hidden` {tuple(policy_rejected_hidden.shape)} must match the batch and "
                   f"hidden size of `policy_chosen_hidden` {tuple(policy_chosen_hidden.shape)}")
    for name, t in (("ref_chosen_logps", ref_chosen_logps), ("ref_rejected_logps", ref_rejected_logps)):
        check(tuple(t.shape) == (B,), lambda: f"{op}: `{name}` must have shape ({B},) (one log-prob per "
                                               f"sequence), got {tuple(t.shape)}")
    check(_number(beta) and finite(beta) and beta > 0,
           lambda: f"{op}: `beta` must be a positive finite number (β ≤ 0 would pull towards the rejected answers, "
                   f"or nowhere), got {beta!r}")
    for name, lab, h in (("chosen_labels", chosen_labels, policy_chosen_hidden),
                         ("rejected_labels", rejected_labels, policy_rejected_hidden)):
        _check_tensor(op, name, lab, floating=False)
        check(lab.dtype in (torch.int64, torch.int32),
              lambda: f"{op}: `{name}` must be int64 (or int32), got {lab.dtype}")
        check(tuple(lab.shape) == tuple(h.shape[:-1]),
               lambda: f"{op}: `{name}` has shape {tuple(lab.shape)} but its hidden states need {tuple(h.shape[:-1])}")
        # named here (the pass below sees them concatenated, and checks the rest of the arguments)
        if weight.dim() == 2 and isinstance(ignore_index, numbers.Integral) and not compiling() \
                and not capturing(lab.device):
            check_label_range(op, lab.reshape(-1), weight.shape[0], int(ignore_index), name)
    rows = torch.cat([policy_chosen_hidden.flatten(0, 1), policy_rejected_hidden.flatten(0, 1)])
    labels = torch.cat([chosen_labels.reshape(-1), rejected_labels.reshape(-1)])
    token_losses = _head_cross_entropy(op, rows, HeadArgs(weight=weight, bias=bias), labels,
                                       ignore_index=ignore_index, reduction="none", label_smoothing=0.0, softcap=None,
                                       num_items=None, backend=backend, chunk_size=None)
    n_c = chosen_labels.numel()
    chosen = -token_losses[:n_c].view(chosen_labels.shape).sum(-1)
    rejected = -token_losses[n_c:].view(rejected_labels.shape).sum(-1)
    return _dpo(chosen, rejected, ref_chosen_logps, ref_rejected_logps, float(beta))


def _dpo(chosen, rejected, ref_chosen, ref_rejected, beta):
    chosen_rewards = beta * (chosen - ref_chosen.float())
    rejected_rewards = beta * (rejected - ref_rejected.float())
    # a mean over no pairs is 0 with zero gradients (the losses' rule), not mean()'s NaN
    loss = (-F.logsigmoid(chosen_rewards - rejected_rewards)).sum() / max(chosen_rewards.shape[0], 1)
    return loss, chosen_rewards.detach(), rejected_rewards.detach()


# ----------------------------------------------------------------------------------------------
# references: plain torch with the logits materialised (the ground truth of the tests)

def _reference_denominator(labels, ignore_index, num_items):
    if num_items is not None:
        return torch.as_tensor(num_items, dtype=torch.float64).reshape(())
    return (labels != ignore_index).sum().clamp(min=1)


def linear_cross_entropy_reference(hidden, weight, labels, *, bias=None, ignore_index=-100, reduction="mean",
                                   label_smoothing=0.0, softcap=None, num_items=None):
    logits = F.linear(hidden, weight, bias)
    logits = logits.double() if logits.dtype == torch.float64 else logits.float()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    flat = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=ignore_index,
                           reduction="none", label_smoothing=label_smoothing)
    if reduction == "none":
        return flat.view(labels.shape)
    if reduction == "sum":
        return flat.sum()
    return flat.sum() / _reference_denominator(labels, ignore_index, num_items).to(flat.device, flat.dtype)


def linear_kl_div_reference(student_hidden, student_weight, teacher_hidden, teacher_weight, *, temperature=1.0,
                            direction="forward", labels=None, ignore_index=-100, reduction="mean", num_items=None):
    up = lambda t: t.double() if t.dtype == torch.float64 else t.float()  # noqa: E731
    log_ps = F.log_softmax(up(F.linear(student_hidden, student_weight)) / temperature, dim=-1)
    log_pt = F.log_softmax(up(F.linear(teacher_hidden, teacher_weight)).detach() / temperature, dim=-1)
    if direction == "forward":
        kl = (log_pt.exp() * (log_pt - log_ps)).sum(-1)
    else:
        kl = (log_ps.exp() * (log_ps - log_pt)).sum(-1)
    if labels is not None:
        kl = kl.masked_fill(labels == ignore_index, 0.0)
    return _reduce_teacher_rows(kl, reduction, labels, ignore_index, num_items)


def _reduce_teacher_rows(rows, reduction, labels, ignore_index, num_items):
    """The KL-style references' reduction: "mean" over the counted rows (all of them without labels) or num_items."""
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    if num_items is None and labels is None:
        return rows.sum() / max(rows.numel(), 1)
    return rows.sum() / _reference_denominator(labels, ignore_index, num_items).to(rows.device, rows.dtype)


def linear_distill_loss_reference(student_hidden, student_weight, teacher_hidden, teacher_weight, labels=None, *,
                                  kl_weight=1.0, reverse_kl_weight=0.0, ce_weight=0.0, temperature=1.0,
                                  ignore_index=-100, reduction="mean", num_items=None):
    opts = dict(labels=labels, ignore_index=ignore_index, reduction="none")
    rows = 0.0
    for weight, direction in ((kl_weight, "forward"), (reverse_kl_weight, "reverse")):
        if weight:
            rows = rows + weight * linear_kl_div_reference(student_hidden, student_weight, teacher_hidden,
                                                           teacher_weight, temperature=temperature,
                                                           direction=direction, **opts)
    if ce_weight:
        rows = rows + ce_weight * linear_cross_entropy_reference(student_hidden, student_weight, labels,
                                                                 ignore_index=ignore_index, reduction="none")
    return _reduce_teacher_rows(rows, reduction, labels, ignore_index, num_items)


def linear_sequence_logprobs_reference(hidden, weight, labels, *, bias=None, ignore_index=-100, softcap=None):
    return -linear_cross_entropy_reference(hidden, weight, labels, bias=bias, ignore_index=ignore_index,
                                           reduction="none", softcap=softcap).sum(-1)


def linear_dpo_loss_reference(policy_chosen_hidden, policy_rejected_hidden, weight, chosen_labels, rejected_labels, *,
                              ref_chosen_logps, ref_rejected_logps, beta=0.1, ignore_index=-100, bias=None):
    chosen = linear_sequence_logprobs_reference(policy_chosen_hidden, weight, chosen_labels, bias=bias,
                                                ignore_index=ignore_index)
    rejected = linear_sequence_logprobs_reference(policy_rejected_hidden, weight, rejected_labels, bias=bias,
                                                  ignore_index=ignore_index)
    rewards_c = beta * (chosen - ref_chosen_logps.to(chosen.dtype))
    rewards_r = beta * (rejected - ref_rejected_logps.to(rejected.dtype))
    loss = (-F.logsigmoid(rewards_c - rewards_r)).sum() / max(rewards_c.shape[0], 1)  # 0 over no pairs
    return loss, rewards_c.detach(), rewards_r.detach()


__all__ = ["linear_cross_entropy", "linear_cross_entropy_reference", "linear_dpo_loss",
           "linear_dpo_loss_reference", "linear_kl_div", "linear_kl_div_reference", "linear_sequence_logprobs",
           "linear_sequence_logprobs_reference", "lm_head_cross_entropy"]
