"""Held-out evaluation for `fastft train`: the objective's loss (and accuracy, reward accuracy or CE) summed over
every process, the one-line summaries the run prints, and QLoRA's merged-model evaluations.
"""
from __future__ import annotations

import copy

import torch

from fastft.apps.training.config import TrainConfig
from fastft.apps.training.objectives import ObjectiveModel, checked_on_host_for, documents_alone, is_prompt_learning


@torch.no_grad()
def evaluate(module: ObjectiveModel, records, make_batch, batch_size: int, accelerator) -> dict | None:
    """The objective's mean loss on held-out records (+ accuracy for classification, reward accuracy for dpo),
    summed over all processes. Every process runs the same number of forwards (FSDP2 gathers in each)."""
    if not records:
        return None
    world, rank = accelerator.num_processes, accelerator.process_index
    if is_prompt_learning(module.model) or documents_alone(module.model):
        # its forward runs each document alone: with one record per process per forward (a dummy where none is left)
        # every process gathers the same FSDP2 weights as often
        batch_size = 1
    was_training = module.training
    module.eval()
    sums = torch.zeros(4, dtype=torch.float64)  # loss, count, hits, examples
    chunk = world * batch_size
    for start in range(0, len(records), chunk):
        mine = list(range(start + rank * batch_size, min(start + (rank + 1) * batch_size, len(records))))
        batch = make_batch(records, mine or [start], cache=False)
        with accelerator.autocast(), checked_on_host_for(batch):
            loss, stats = module(batch)
        if mine:
            examples = batch["num_documents"] // 2 if module.objective == "dpo" else batch["num_documents"]
            hits = stats.get("hits", stats.get("preferred", stats.get("ce", 0.0)))
            sums += torch.tensor([float(loss), module.count(batch), float(hits), examples], dtype=torch.float64)
    sums = accelerator.reduce(sums.to(accelerator.device), "sum").cpu()
    module.train(was_training)
    loss, count, hits, examples = sums.tolist()
    result = {"loss": loss / max(count, 1), "examples": int(examples)}
    if module.objective == "dpo":
        result["reward_accuracy"] = hits / max(examples, 1)
    elif module.objective == "distill":
        result["ce"] = hits / max(count, 1)
    elif "choices" in make_batch(records, [0], cache=False):
        result["accuracy"] = hits / max(examples, 1)
    return result


def objective_knobs(cfg: TrainConfig, teacher) -> dict:
    """ObjectiveModel's settings from the run's: every model a run evaluates uses the same ones."""
    return dict(teacher=teacher, dpo_beta=cfg.dpo_beta, kl_weight=cfg.kl_weight,
                reverse_kl_weight=cfg.reverse_kl_weight, ce_weight=cfg.ce_weight, temperature=cfg.temperature)


def describe(name: str, result: dict | None) -> str:
    if result is None:
        return f"{name}: no evaluation data"
    first = [k for k in ("accuracy", "reward_accuracy") if k in result]
    parts = [f"{k} {result[k]:.3f}" for k in first + [k for k in result if k not in first and k != "examples"]]
    return f"{(name + ':').ljust(7)} {', '.join(parts)}"


def evaluate_merges(inner, objective, eval_records, make_batch, cfg, accelerator, log) -> dict:
    """QLoRA: what merging costs. The adapter merged into dequantized (dense) weights, and merged then
    quantized to NF4 again, each evaluated like the trained model."""
    import fastft

    results = {}
    for name, requantize in (("dense", False), ("requantized", True)):
        merged = fastft.merge_and_unload(copy.deepcopy(inner), requantize=requantize)
        module = ObjectiveModel(merged, objective.objective, **objective_knobs(cfg, objective._teacher[0]))
        results[name] = evaluate(module, eval_records, make_batch, cfg.eval_batch_size, accelerator)
        log(describe(f"merged ({name})", results[name]))
        del merged, module
    return results
