"""`fastft train`: LoRA fine-tuning of a causal LM on a labelled text task, on accelerate.

The model learns to emit the task's label word after a prompt (loss on that one token). Before and after
training it is evaluated on a fixed held-out split (accuracy among the label words, and loss). The
adapter is saved in peft's format (atomically), with metrics.json beside it.
"""
from __future__ import annotations

import json
import math
import os
import resource
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from fastft.apps.datasets import Task, load_task
from fastft.apps.models import SMOLLM2, load_causal_lm

ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class TrainConfig:
    model: str = SMOLLM2
    task: str = "mr"
    steps: int = 40
    batch_size: int = 8
    lr: float = 1e-3
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    rslora: bool = False
    target_modules: tuple[str, ...] = ALL_LINEAR
    max_length: int = 64
    eval_examples: int = 160
    eval_batch_size: int = 32
    seed: int = 0
    output_dir: str = "runs/lora-smollm2-mr"
    dtype: str = "auto"  # auto: bf16 on a GPU, fp32 on the CPU
    quantize: str | None = None  # "nf4": QLoRA on NF4 base weights (lm_head stays dense)


def _dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def label_token_ids(tokenizer, task: Task) -> list[int]:
    ids = []
    for word in task.label_words:
        tokens = tokenizer(word, add_special_tokens=False)["input_ids"]
        if len(tokens) != 1:
            raise ValueError(f"task {task.name}: label word {word!r} is {len(tokens)} tokens for this tokenizer; "
                             "label words must be single tokens")
        ids.append(tokens[0])
    return ids


def make_collate(tokenizer, task: Task, label_ids: list[int], max_length: int):
    """Left-padded prompt + label token, so every example's label sits in the last position.

    Prompts are truncated from the left of the text so the template's tail and label stay intact.
    """
    def collate(examples):
        rows = []
        for text, label in examples:
            prompt = tokenizer(task.template.format(text=text), add_special_tokens=False)["input_ids"]
            rows.append(prompt[-(max_length - 1):] + [label_ids[label]])
        width = max(len(r) for r in rows)
        pad = tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
        labels = torch.tensor([label for _, label in examples])
        return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}

    return collate


def label_logits(model, batch):
    """Logits at the position that predicts the label token (the second to last)."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=2)
    return out.logits[:, 0].float()


@torch.no_grad()
def evaluate(model, loader, label_ids: list[int], accelerator) -> dict:
    """Accuracy among the label words and full-vocabulary loss, gathered over all processes."""
    model.eval()
    hits, losses = [], []
    for batch in loader:
        logits = label_logits(model, batch)
        targets = torch.tensor(label_ids, device=logits.device)[batch["labels"]]
        loss = F.cross_entropy(logits, targets, reduction="none")
        hit = (logits[:, label_ids].argmax(-1) == batch["labels"]).float()
        hit, loss = accelerator.gather_for_metrics((hit, loss))
        hits.append(hit.cpu())
        losses.append(loss.cpu())
    model.train()
    hits, losses = torch.cat(hits), torch.cat(losses)
    return {"accuracy": hits.mean().item(), "loss": losses.mean().item(), "examples": len(hits)}


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def _write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def _evaluate_merges(model, eval_loader, label_ids, accelerator, log) -> dict:
    """QLoRA: what merging costs. The adapter merged into dequantized (dense) weights, and merged then
    quantized to NF4 again, each evaluated like the trained model."""
    import copy

    import fastft

    results = {}
    unwrapped = accelerator.unwrap_model(model)
    for name, requantize in (("dense", False), ("requantized", True)):
        merged = fastft.merge_and_unload(copy.deepcopy(unwrapped), requantize=requantize)
        results[name] = evaluate(merged, eval_loader, label_ids, accelerator)
        log(f"merged ({name}): accuracy {results[name]['accuracy']:.3f}, loss {results[name]['loss']:.3f}")
        del merged
    return results


def train(cfg: TrainConfig) -> dict:
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from peft import LoraConfig

    import fastft

    # cpu=True lets accelerate set up gloo for multi-process runs (torchrun) on machines without a GPU.
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    device = accelerator.device
    set_seed(cfg.seed)
    log = accelerator.print

    model, tokenizer = load_causal_lm(cfg.model, dtype=_dtype(cfg.dtype, device))
    task = load_task(cfg.task, seed=cfg.seed)
    label_ids = label_token_ids(tokenizer, task)
    collate = make_collate(tokenizer, task, label_ids, cfg.max_length)
    # A seeded order fixed up front: the same global batches whatever the number of processes.
    order = torch.randperm(len(task.train), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
    train_loader = torch.utils.data.DataLoader([task.train[i] for i in order], batch_size=cfg.batch_size,
                                               collate_fn=collate, drop_last=True)
    eval_loader = torch.utils.data.DataLoader(task.eval[: cfg.eval_examples], batch_size=cfg.eval_batch_size,
                                              collate_fn=collate)
    log(f"fastft train: {cfg.model} on {task.description}; {len(task.train)} train / "
        f"{min(cfg.eval_examples, len(task.eval))} eval examples (split seed {cfg.seed}); device {device}")

    model.to(device)
    eval_loader = accelerator.prepare(eval_loader)
    before = evaluate(model, eval_loader, label_ids, accelerator)
    log(f"before: accuracy {before['accuracy']:.3f}, loss {before['loss']:.3f}")

    if cfg.quantize:
        fastft.quantize_model(model, cfg.quantize)
        before_q = evaluate(model, eval_loader, label_ids, accelerator)
        log(f"quantized to {cfg.quantize}: accuracy {before_q['accuracy']:.3f}, loss {before_q['loss']:.3f}")
    lora_config = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, use_rslora=cfg.rslora,
                             target_modules=list(cfg.target_modules), task_type="CAUSAL_LM")
    model = fastft.get_peft_model(model, lora_config)
    from fastft.integration.parameter_count import parameter_counts  # NF4 weights once, by logical size

    trainable, total = parameter_counts(model)
    log(f"LoRA r={cfg.rank} alpha={cfg.alpha} on {', '.join(cfg.target_modules)}: "
        f"{trainable:,} trainable of {total:,} parameters")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / max(1, cfg.steps // 10)) * 0.5 * (1 + math.cos(math.pi * s / cfg.steps)))
    model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model.train()
    tokens = 0
    losses = []
    start = time.perf_counter()
    batches = iter(train_loader)
    bar = tqdm(range(cfg.steps), desc="train", disable=not accelerator.is_local_main_process, dynamic_ncols=True)
    for step in bar:
        try:
            batch = next(batches)
        except StopIteration:
            batches = iter(train_loader)
            batch = next(batches)
        logits = label_logits(model, batch)
        targets = torch.tensor(label_ids, device=logits.device)[batch["labels"]]
        loss = F.cross_entropy(logits, targets)
        accelerator.backward(loss)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        tokens += int(batch["attention_mask"].sum()) * accelerator.num_processes
        losses.append(accelerator.reduce(loss.detach(), "mean").item())  # the global batch's loss
        elapsed = time.perf_counter() - start
        bar.set_postfix(loss=f"{losses[-1]:.3f}", tok_s=f"{tokens / elapsed:,.0f}",
                        mem=f"{peak_memory_gib(device):.2f}GiB")
    train_seconds = time.perf_counter() - start
    peak = peak_memory_gib(device)

    after = evaluate(model, eval_loader, label_ids, accelerator)
    log(f"after:  accuracy {after['accuracy']:.3f}, loss {after['loss']:.3f}")
    merged = _evaluate_merges(model, eval_loader, label_ids, accelerator, log) if cfg.quantize else None
    metrics = {
        "config": asdict(cfg), "device": str(device), "processes": accelerator.num_processes,
        "trainable_parameters": trainable, "total_parameters": total,
        "eval_before": before, "eval_after": after,
        "train_losses": losses,
        "train_seconds": train_seconds, "tokens_per_second": tokens / train_seconds,
        "eval_merged": merged,
        "peak_memory_gib": peak, "peak_memory_kind": "cuda allocated" if device.type == "cuda" else "process RSS",
    }
    if accelerator.is_main_process:
        out = Path(cfg.output_dir)
        fastft.save_adapter(accelerator.unwrap_model(model), out / "adapter")
        _write_json_atomic(out / "metrics.json", metrics)
        log(f"{tokens / train_seconds:,.0f} tokens/s, peak memory {peak:.2f} GiB ({metrics['peak_memory_kind']}); "
            f"adapter saved to {out / 'adapter'}")
    return metrics
