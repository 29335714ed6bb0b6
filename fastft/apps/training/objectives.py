"""What a micro-batch's loss is: next-token cross-entropy (sft), DPO against the adapter-free base, and
distillation from a teacher's logits — each as a *sum* over the micro-batch, so the loop can divide by the
step's true target count (exact gradient accumulation).

Hidden states, not logits, come out of the model: the LM head is applied only at positions that carry a
loss, through fastft's fused linear losses where they fit: `token_cross_entropy_sum` and the DPO sequence
log-probs go through fastft.ops.lm_head_cross_entropy (no logits tensor; LoRA and NF4 heads train);
`distill_loss_sum` goes through fastft.ops.linear_distill_loss (every term in one pass) where both heads are plain
(it takes plain weights only) and applies the heads in torch otherwise.
"""
from __future__ import annotations

import contextlib
import warnings

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils.other import AuxiliaryTrainingWrapper
from torch import nn

from fastft.integration.base_layers import attribute_set
from fastft.integration.packing import IGNORE_INDEX
from fastft.modules.lora import plain_linear
from fastft.ops.linear_losses import checked_on_host, linear_distill_loss, lm_head_cross_entropy
from fastft.ops.lm_head import head_of_module


# ------------------------------------------------------------------ the fused-loss places
# `head` is the model's lm_head module (plain, LoRA-adapted or NF4): the fused losses apply it a chunk of tokens
# at a time, so no (tokens × vocab) logits tensor is made and a LoRA adapter on lm_head gets its gradient.
# head None: `hidden` are logits already (peft prompt-learning models).

def _logits(hidden, head, softcap=None) -> torch.Tensor:
    """head(hidden) in fp32, softcapped (or `hidden` itself when head is None: the model's own logits)."""
    if head is None:
        return hidden.float()
    logits = head(hidden).float()
    return logits if softcap is None else softcap * torch.tanh(logits / softcap)


def _fused(head) -> bool:
    """Whether the fused loss takes this head; one it refuses (DoRA or IA3 on lm_head, lora_bias, ...) trains
    through head(hidden) in torch instead."""
    if head is None:
        return False
    try:
        head_of_module("lm_head_cross_entropy", head, check_only=True)
    except (TypeError, ValueError) as why:  # a module type or an adapter option it does not take
        if type(head) not in _WARNED:
            _WARNED.add(type(head))
            warnings.warn(f"fastft train: the lm_head runs unfused (the full tokens × vocab logits in fp32): {why}",
                          stacklevel=3)
        return False
    return True


_WARNED: set = set()  # head types the unfused-loss warning was given for (once each)


def _cross_entropy(hidden, head, targets, reduction, softcap) -> torch.Tensor:
    if _fused(head):
        return lm_head_cross_entropy(hidden, head, targets, reduction=reduction, softcap=softcap)
    return F.cross_entropy(_logits(hidden, head, softcap), targets, reduction=reduction)


def token_cross_entropy_sum(hidden, head, targets, softcap=None) -> torch.Tensor:
    """Σ CE(head(hidden), targets) over rows, through fastft.ops.lm_head_cross_entropy."""
    return _cross_entropy(hidden, head, targets, "sum", softcap)


def sequence_logprobs(hidden, head, targets, target_docs, num_docs, softcap=None) -> torch.Tensor:
    """Σ log p(target) per document (num_docs of them)."""
    logp = -_cross_entropy(hidden, head, targets, "none", softcap)
    return logp.new_zeros(num_docs).index_add_(0, target_docs, logp)


def dpo_loss_sum(policy, ref, beta):
    """Σ over pairs of −log σ(β·((π_c − ref_c) − (π_r − ref_r))) from the documents' sequence log-probs,
    alternating chosen, rejected; also the number of pairs whose implicit reward prefers the chosen
    (fastft.ops.linear_dpo_loss is the same loss for separate chosen/rejected batches)."""
    margin = beta * ((policy[0::2] - ref[0::2]) - (policy[1::2] - ref[1::2]))
    return -F.logsigmoid(margin).sum(), (margin > 0).sum()


def distill_loss_sum(hidden, head, teacher_hidden, teacher_head, targets, *,
                     kl_weight, reverse_kl_weight, ce_weight, temperature, softcap=None,
                     teacher_softcap=None) -> torch.Tensor:
    """Σ over target tokens of kl·T²·KL(teacher‖student) + rkl·T²·KL(student‖teacher) + ce·CE(student, labels).
    Plain heads (dense nn.Linear without bias, nothing intercepting them, no softcap) go through the fused
    fastft.ops.linear_distill_loss, one pass for all terms: no tokens × vocab logits in memory (the torch form below keeps
    several fp32 copies of them). Other heads (LoRA, NF4, softcapped) run in torch, so they train too."""
    if _plain_head(head, hidden) and _plain_head(teacher_head, teacher_hidden) and softcap is None \
            and teacher_softcap is None:
        vocab = min(head.weight.shape[0], teacher_head.weight.shape[0])  # heads padded past the shared tokenizer
        # sliced only where padded: a slice's backward writes a zero-filled V x H gradient copy (full fine-tuning)
        student_w, teacher_w = (w if w.shape[0] == vocab else w[:vocab] for w in (head.weight, teacher_head.weight))
        # one fused pass for every term (each chunk's logits made and differentiated once); the CE joins it unless
        # the student's head is padded (its CE spans the whole head, the KL terms the shared vocabulary)
        kl_terms = bool(kl_weight or reverse_kl_weight)
        ce_in_pass = ce_weight if kl_terms and student_w is head.weight else 0.0
        loss = hidden.new_zeros((), dtype=torch.float32)
        if kl_terms:
            loss = linear_distill_loss(hidden, student_w, teacher_hidden, teacher_w, targets,
                                       kl_weight=kl_weight * temperature**2,
                                       reverse_kl_weight=reverse_kl_weight * temperature**2, ce_weight=ce_in_pass,
                                       temperature=temperature, reduction="sum")
        if ce_weight and not ce_in_pass:
            loss = loss + ce_weight * lm_head_cross_entropy(hidden, head, targets, reduction="sum")
        return loss
    student = _logits(hidden, head, softcap)
    with torch.no_grad():
        teacher = _logits(teacher_hidden, teacher_head, teacher_softcap)
    vocab = min(student.shape[-1], teacher.shape[-1])  # heads padded past the shared tokenizer (checked at load)
    full_student, student, teacher = student, student[:, :vocab], teacher[:, :vocab]
    s_log = F.log_softmax(student / temperature, -1)
    t_log = F.log_softmax(teacher / temperature, -1)
    loss = student.new_zeros(())
    counted = (targets != IGNORE_INDEX).to(student.dtype)  # rows a bucketed batch pads with are not
    for weight, (log_p, log_q) in ((kl_weight, (s_log, t_log)), (reverse_kl_weight, (t_log, s_log))):
        if weight:  # KL(q‖p) per row, summed over the counted rows
            rows = F.kl_div(log_p, log_q, log_target=True, reduction="none").sum(-1)
            loss = loss + weight * temperature**2 * (rows * counted).sum()
    if ce_weight:
        loss = loss + ce_weight * F.cross_entropy(full_student, targets, reduction="sum")
    return loss


def _plain_head(head, hidden) -> bool:
    """A plain nn.Linear head (see plain_linear) without bias and with a plain weight (not a DTensor or quantized
    parameter): the fused losses may read its weight instead of calling it. None (a prompt-learning model's own
    softcapped logits, see hidden_at_targets) is not one."""
    return (head is not None and plain_linear(head, hidden.device) and head.bias is None
            and type(head.weight) in (torch.Tensor, nn.Parameter))


# ---------------------------------------------------------------------------------------------- the model

def is_prompt_learning(model) -> bool:
    config = getattr(model, "active_peft_config", None)
    return bool(getattr(config, "is_prompt_learning", False))


# Logit scalings after the head that the objectives (which apply the head themselves) do not reproduce: such a
# model is refused rather than trained on other logits than its own (check_head_gives_logits catches the others).
_UNSUPPORTED_LOGIT_SCALING = ("logit_scale", "logits_scaling", "lm_head_multiplier", "output_multiplier",
                              "logits_mup_width_multiplier")  # Cohere, Granite/MiniCPM3, Falcon-H1, ...


# the final softcap's config name: Gemma 2/3, RecurrentGemma, xLSTM
_FINAL_SOFTCAP = ("final_logit_softcapping", "logits_soft_cap", "output_logit_soft_cap")


def final_softcap(model: nn.Module) -> float | None:
    """The cap of the model's final logit softcapping (Gemma 2/3: cap·tanh(logits/cap)), None without one."""
    from fastft.apps.training.config import ConfigError

    base = causal_lm(model)
    config = getattr(base, "config", None)
    if hasattr(config, "get_text_config"):  # a multimodal model (Gemma3n) keeps them on its text config
        config = config.get_text_config()
    for attr in _UNSUPPORTED_LOGIT_SCALING:
        value = getattr(config, attr, None)
        if value is not None and value != 1:
            raise ConfigError(f"{type(base).__name__} scales its logits after the head (config.{attr} = {value}), "
                              "which fastft train's objectives do not apply; this architecture is not supported")
    caps = [getattr(config, attr, None) for attr in _FINAL_SOFTCAP]
    return next((cap for cap in caps if cap is not None), None)


_WIDE = (torch.float32, torch.float64)


@torch.no_grad()
def check_head_gives_logits(model: nn.Module, what: str) -> None:
    """Refuse (ConfigError naming `what`) a causal LM whose own logits are not its head applied to its last hidden
    states (with the final softcap): the objectives apply the head themselves, so a scaling after it that
    final_softcap does not know (models keep adding them) would train on other logits. One forward of 8 tokens."""
    from fastft.apps.training.config import ConfigError

    backbone, head = causal_lm_parts(model)
    device = next(model.parameters()).device
    ids = (torch.arange(1, 9, device=device) % head.weight.shape[0])[None]
    training = model.training
    model.eval()
    try:
        theirs = model(input_ids=ids, use_cache=False).logits
        # a dtype's rounding apart (bf16/fp16 logits, an NF4 head: 2^-8 relative); a scaling is far more. An fp32
        # nn.Linear head computes the same product both ways: only a scaling moves it (RecurrentGemma's cap of 30
        # moved logits of 6 by 1%)
        exact = type(head) is nn.Linear and head.weight.dtype in _WIDE and theirs.dtype in _WIDE
        theirs = theirs.float()
        ours = _logits(backbone(input_ids=ids, use_cache=False).last_hidden_state, head, final_softcap(model))
    finally:
        model.train(training)
    gap = (ours - theirs).abs().max().item()
    if not gap <= (1e-4 if exact else 2e-2) * theirs.abs().max().item() + 1e-3:
        raise ConfigError(f"{what}: {type(model).__name__} transforms its logits after the head in a way fastft "
                          f"train's objectives do not reproduce (its logits differ from lm_head(hidden states) by "
                          f"up to {gap:.3g}); this architecture is not supported")


def check_vocab_rows(student: nn.Module, teacher: nn.Module, tokens: int, teacher_name: str) -> None:
    """Distillation compares the heads' first min(rows) logits (heads are often padded past the tokenizer, e.g.
    to a multiple of 64): both must cover the shared tokenizer's `tokens` ids."""
    from fastft.apps.training.config import ConfigError

    rows = {name: causal_lm_parts(m)[1].weight.shape[0] for name, m in (("student", student), ("teacher", teacher))}
    if min(rows.values()) < tokens:
        raise ConfigError(f"--teacher {teacher_name}: the student's head has {rows['student']} rows and the "
                          f"teacher's {rows['teacher']}, fewer than the tokenizer's {tokens} ids; distillation needs "
                          "a logit for every token on both sides")


_DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)


def disable_model_dropout(model: nn.Module) -> int:
    """Every dropout of `model` off: its nn.Dropout modules and the attention modules' `attention_dropout` rate
    (transformers' attention takes it as a float). DPO's reference pass runs the same modules in train mode, so with
    dropout on, the policy's and the reference's log-probs would each be drawn with their own mask: noise in every
    implicit reward. TRL's DPOTrainer turns the model's dropout off too (disable_dropout=True). Call it before the
    adapters are added: their dropout is --dropout's. Returns how many were on."""
    on = 0
    for module in model.modules():
        if isinstance(module, _DROPOUTS) and module.p:
            module.p, on = 0.0, on + 1
        rate = getattr(module, "attention_dropout", None)
        if isinstance(rate, float) and rate:
            module.attention_dropout, on = 0.0, on + 1
    return on


def checked_on_host_for(batch: dict):
    """Around a call of the (maybe compiled) ObjectiveModel on a batch whose ids batches.Batches checked on the host:
    the fused losses skip their device read (outside the compiled code: dynamo cannot trace a ContextVar's set)."""
    return checked_on_host() if batch.get("checked_on_host") else contextlib.nullcontext()


def token_rows(model: nn.Module, teacher: nn.Module | None = None) -> int:
    """The fewest token rows of `model`'s input embeddings and lm_head (and the teacher's head): every token id and
    label a batch holds must be below it."""
    rows = []
    for m in (model, teacher):
        if m is None:
            continue
        backbone, head = causal_lm_parts(m)
        if m is model:
            rows.append(input_embeddings(m).num_embeddings)
        if head is not None:
            rows.append(getattr(head, "out_features", None) or head.weight.shape[0])
    return min(rows)


def causal_lm(model: nn.Module) -> nn.Module:
    """The transformers causal LM: `model` itself, or the one inside a PeftModel."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def causal_lm_parts(model: nn.Module):
    """(backbone, lm_head) of a transformers causal LM, or of the one inside a PeftModel."""
    base = causal_lm(model)
    backbone = base.base_model
    if backbone is base:  # Llama 4 / Mllama's text models name a base_model_prefix they do not use: .model
        backbone = getattr(base, "model", base)
    return backbone, base.get_output_embeddings()


def input_embeddings(model: nn.Module) -> nn.Module:
    """The token embeddings of a causal LM (or of the one inside a PeftModel), asked of the causal LM itself: a
    decoder wrapper's backbone (BART-family ...ForCausalLM) does not answer get_input_embeddings."""
    base = causal_lm(model)
    return base.get_input_embeddings()


def _model_inputs(batch: dict) -> dict:
    keys = ("input_ids", "position_ids", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")
    return {k: batch[k] for k in keys if k in batch}


def hidden_at_targets(model: nn.Module, batch: dict):
    """(hidden rows at the positions that predict a target, their targets, their documents, the lm_head module).

    Peft prompt-learning methods (prefix/prompt tuning) must run through the PeftModel's own forward (it adds
    the virtual tokens): it runs with the head swapped for the identity, so its "logits" are the hidden states and
    the fused loss applies the head (no tokens × vocab logits, no fp32 log-softmax kept for backward); a model that
    softcaps its logits gives them (head None)."""
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE_INDEX
    at = _targets_at(batch, keep)
    docs = batch["document_ids"][:, :-1].flatten().index_select(0, at)
    targets = targets.flatten().index_select(0, at)
    if is_prompt_learning(model):
        # peft's prompt-learning forward ignores position_ids, so a packed row would let documents attend to
        # each other: each document runs on its own (no padding either), virtual tokens cut off the logits.
        # Document d's logits but its last (which would predict the next document's first token, never a target)
        # are the packed positions a_d .. a_d + n_d - 2: position p sits at row p - d of their concatenation.
        with _without_head(model) as head:
            rows = torch.cat([model(input_ids=piece[None], use_cache=False).logits[0, -len(piece):-1]
                              for piece in _documents(batch)])
        weight = None if head is None else getattr(head, "weight", None)
        if rows.dtype == torch.float32 and type(weight) in (torch.Tensor, nn.Parameter) and weight.element_size() == 2:
            rows = rows.to(weight.dtype)  # a forward that upcasts its logits (Mamba) upcast the 16-bit hidden states
        return rows.index_select(0, at - docs), targets, docs, head
    backbone, head = causal_lm_parts(model)
    if backbone.__dict__.get("_fastft_documents_alone"):  # its attention would let packed documents see each other
        states = [backbone(input_ids=piece[None], use_cache=False).last_hidden_state[0] for piece in _documents(batch)]
        filler = batch["input_ids"].shape[1] - sum(len(h) for h in states)  # a bucketed row's (never a target)
        hidden = torch.cat(states + [states[0].new_zeros(filler, states[0].shape[-1])])[None]
    else:  # use_cache=False: transformers gives sdpa/eager the packed block mask only without a cache
        hidden = backbone(**_model_inputs(batch), use_cache=False).last_hidden_state
    return hidden[:, :-1].flatten(0, 1).index_select(0, at), targets, docs, head


@contextlib.contextmanager
def _without_head(model: nn.Module):
    """The causal LM's lm_head replaced by the identity for the block (its forward then returns hidden states as
    logits), yielding the head; yields None and changes nothing where the model's logits are more than head(hidden)
    (a final softcap: check_head_gives_logits holds them to that) or the head is not a direct child."""
    base = causal_lm(model)
    head = base.get_output_embeddings()
    name = next((n for n, child in base.named_children() if child is head), None)
    if head is None or name is None or final_softcap(model) is not None:
        yield None
        return
    with attribute_set([base], name, _HeadWeightOnly(head)):
        yield head


class _HeadWeightOnly(nn.Identity):
    """The identity in the head's place that still shows the head's weight: Mamba's and HY-V4's forwards cast their
    hidden states to lm_head.weight.dtype before the head."""

    def __init__(self, head: nn.Module):
        super().__init__()
        self.__dict__["_head"] = head  # not a submodule: its parameters stay the head's alone

    @property
    def weight(self):
        return self._head.weight


def _documents(batch: dict) -> tuple:
    """The packed row's real documents' token ids, each on its own (not a bucketed row's fillers, at its end):
    split at pack's host-side lengths (no device read), or where the document ids change."""
    ids = batch["input_ids"][0]
    lengths = batch.get("document_lengths")
    if lengths is None:
        doc = batch["document_ids"][0]
        lengths = torch.unique_consecutive(doc, return_counts=True)[1].tolist()
    return torch.split(ids, lengths)[:batch.get("num_documents", len(lengths))]


def packing_isolates(model: nn.Module, flash_kwargs: bool) -> bool:
    """Whether a packed row keeps its documents apart in `model` (a causal LM or a PeftModel around one). transformers
    builds sdpa/eager's block-diagonal mask from position_ids for most architectures, not for all: OPT, BioGPT and
    XGLM build one causal mask over the row, BLOOM and MPT (ALiBi) take no position_ids. One document packed after
    two different ones of the same length: rows of the same shape, so apart its states are the same to rounding
    (0.0 for Llama in fp32 and bf16) and a leak moves them (1e-2 relative for a random ALiBi model, where distant
    keys fade; 0.25 for OPT), in any dtype. Once, no grad, eval mode (no dropout); `flash_kwargs`: the rows carry
    cu_seq_lens (fastft attention)."""
    from fastft.integration.packing import PackingCollator

    backbone, _ = causal_lm_parts(model)
    vocab = input_embeddings(model).num_embeddings
    second = [(11 * i + 5) % vocab for i in range(7)]
    device = next(backbone.parameters()).device
    training = backbone.training
    backbone.eval()
    states = []
    try:
        for shift in (3, 4):
            first = [(7 * i + shift) % vocab for i in range(5)]
            batch = PackingCollator(pad_token_id=0, return_flash_kwargs=flash_kwargs)(
                [{"input_ids": ids, "labels": ids} for ids in (first, second)])
            batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            with torch.no_grad():
                states.append(backbone(**_model_inputs(batch), use_cache=False).last_hidden_state[0, 5:].float())
    finally:
        backbone.train(training)
    return bool((states[0] - states[1]).norm() <= 1e-4 * states[0].norm())


def run_documents_alone(model: nn.Module, alone: bool) -> None:
    """Mark `model`'s backbone to run each packed document on its own (hidden_at_targets): correct where packing
    would leak (packing_isolates), at one forward per document."""
    causal_lm_parts(model)[0].__dict__["_fastft_documents_alone"] = alone


def documents_alone(model: nn.Module) -> bool:
    """Whether `model` runs each packed document on its own (run_documents_alone)."""
    return not is_prompt_learning(model) and bool(causal_lm_parts(model)[0].__dict__.get("_fastft_documents_alone"))


def _targets_at(batch: dict, keep: torch.Tensor) -> torch.Tensor:
    """Positions of the flattened shifted rows that carry a loss: `pack` found them on the host (a boolean mask
    here would sync the device and, under torch.compile, break the graph: its size depends on the data)."""
    at = batch.get("target_positions")
    return keep.flatten().nonzero()[:, 0] if at is None else at.to(keep.device)


class ObjectiveModel(nn.Module):
    """The trained model with its objective: forward(batch) → (loss summed over the micro-batch, stats).

    This is what accelerate wraps (DDP/FSDP), so gradient sync and parameter gathering happen around the whole
    loss. The teacher is held outside the module tree: it is not trained, synced or sharded.
    """

    def __init__(self, model: nn.Module, objective: str, *, teacher: nn.Module | None = None, dpo_beta: float = 0.1,
                 kl_weight: float = 1.0, reverse_kl_weight: float = 0.0, ce_weight: float = 0.0,
                 temperature: float = 1.0):
        super().__init__()
        self.model = model
        self.objective = objective
        self._teacher = (teacher,)
        self.dpo_beta = dpo_beta
        self.softcap = final_softcap(model)
        self.distill = dict(kl_weight=kl_weight, reverse_kl_weight=reverse_kl_weight, ce_weight=ce_weight,
                            temperature=temperature, softcap=self.softcap,
                            teacher_softcap=None if teacher is None else final_softcap(teacher))

    def count(self, batch: dict) -> int:
        """What the step's loss is averaged over: target tokens, or pairs for dpo."""
        if self.objective == "dpo":
            return batch["num_documents"] // 2
        if "num_targets" in batch:  # pack's, found on the host (its target positions may be padded): no device read
            return batch["num_targets"]
        return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())

    def forward(self, batch: dict):
        hidden, targets, docs, head = hidden_at_targets(self.model, batch)
        stats = {}
        if self.objective == "dpo":
            n = batch["num_documents"]
            policy = sequence_logprobs(hidden, head, targets, docs, n, self.softcap)
            # the reference is the whole model without adapters, its head included (a LoRA or modules_to_save
            # lm_head is adapted too): the head is applied inside the same block
            with torch.no_grad(), adapters_disabled(self.model):
                ref_hidden, _, _, ref_head = hidden_at_targets(self.model, batch)
                ref = sequence_logprobs(ref_hidden, ref_head, targets, docs, n, self.softcap)
            loss, stats["preferred"] = dpo_loss_sum(policy, ref, self.dpo_beta)
        elif self.objective == "distill":
            with torch.no_grad():
                t_hidden, _, _, t_head = hidden_at_targets(self._teacher[0], batch)
            loss = distill_loss_sum(hidden, head, t_hidden, t_head, targets, **self.distill)
            if not self.training:  # evaluation reports it; in training it was one more pass over the head, unread
                with torch.no_grad():
                    stats["ce"] = token_cross_entropy_sum(hidden, head, targets, self.softcap)
        else:
            loss = token_cross_entropy_sum(hidden, head, targets, self.softcap)
            if not self.training and "choices" in batch:  # classification: accuracy among the label words
                with torch.no_grad():
                    choices = batch["choices"].to(hidden.device)[docs]
                    logits = _logits(hidden, head, self.softcap).gather(1, choices)
                    stats["hits"] = (choices.gather(1, logits.argmax(1, keepdim=True))[:, 0] == targets).sum()
        return loss, stats


@contextlib.contextmanager
def adapters_disabled(model):
    """The model without its adapters (DPO's reference, run under torch.no_grad), as peft's
    PeftModel.disable_adapter() runs LoRA-family tuners, but flipping only each adapter layer's disabled flag and
    putting back what it was. peft's also builds every module's repr on each call (its status check: ~50 ms a DPO step
    on a 30-layer all-linear LoRA model on the CPU; an NF4 weight's repr cannot be traced) and flips requires_grad
    on every adapter tensor (not traceable either): two graph breaks a step under torch.compile. Prompt learning and
    fastft's own adapter models keep their disable_adapter."""
    config = getattr(model, "peft_config", {}).get(getattr(model, "active_adapter", None))
    if config is None or config.is_prompt_learning or getattr(config, "is_adaption_prompt", False):
        with model.disable_adapter():
            yield
        return
    layers = (m for m in model.modules() if isinstance(m, (BaseTunerLayer, AuxiliaryTrainingWrapper)))
    with attribute_set(layers, "_disable_adapters", True):
        yield
