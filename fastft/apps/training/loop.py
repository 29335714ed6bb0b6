"""`fastft train`'s run: build the model through `apply_method`, train with exact accumulation on accelerate,
evaluate, checkpoint, resume, save.

A step's loss is Σ (loss over every target of every micro-batch of every process) / (their number): the
target count is all-reduced first (one small all-reduce a step; counted on the host with one process), then
each micro-batch's summed loss is divided by it (times the process count, which DDP's gradient averaging divides
out again). The next step's micro-batches are built while the device runs the step's queued work.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from fastft.apps.compiling import dynamo_counts
from fastft.apps.training import checkpoints as ckpt
from fastft.files import atomic_write, replace_folder, write_failures_as_os_errors
from fastft.integration.checkpointing import enable_checkpointing
from fastft.integration.parameter_count import parameter_counts
from fastft.integration.sharded_state import run_shared
from fastft.apps.training.config import (LORA_METHODS, ConfigError, TrainConfig, epochs_to_steps, length_problem,
                                         rank_problem, teacher_dtype, to_yaml_dict, unused_settings, validate,
                                         weights_dtype)
from fastft.apps.training.batches import CUT_RULE, Batches, record_flags
from fastft.apps.training.data import BatchPlan, Encoder, check_tokenizer
from fastft.apps.training.evaluation import describe, evaluate, evaluate_merges, objective_knobs
from fastft.apps.training.finished_merge import merge_finished_run
from fastft.apps.training.records import data_fingerprint, load_records, records_digest
from fastft.apps.training.logs import RunLog, peak_memory_gib
from fastft.apps.optimizers import make_optimizer
from fastft.apps.training.objectives import (ObjectiveModel, causal_lm, check_head_gives_logits, check_vocab_rows,
                                             checked_on_host_for, disable_model_dropout, documents_alone,
                                             is_prompt_learning, packing_isolates, run_documents_alone, token_rows)
from fastft.apps.provenance import git_commit
from fastft.apps.training.resume_checks import (check_finished_run_settings, check_resumed_data,
                                               check_resumed_dtypes, check_resumed_layout, check_resumed_settings,
                                               check_resumed_step, finished_metrics, resolved_dtypes,
                                               resume_may_change)
from fastft.apps.training.run_lock import hold_output_dir
from fastft.apps.training.run_setup import (apply_method_or_config_error, distribution_layout,
                                            inductor_takes_torch_random, launcher_notes, load_models,
                                            make_accelerator, maybe_patch, nf4_fsdp_problem, patch_problem,
                                            precision_notes, shard_model)


class TrainingStopped(RuntimeError):
    """The run cannot go on (non-finite loss, out of memory); the message says where the last checkpoint is."""


def lr_factor(cfg: TrainConfig):
    """The factor of --lr at step s (0-based): linear warm-up over the first ceil(warmup_ratio·steps) steps, the
    last of them at the peak, then cosine / linear decay from the peak towards 0 over the remaining steps (the
    last step still trains: its factor is above 0), or constant."""
    # ceil, as transformers' get_warmup_steps, of the product rounded first: 10 × 0.3 is 3.0000000000000004 in floats
    warm = max(1, math.ceil(round(cfg.steps * cfg.warmup_ratio, 9)))
    decay = {"cosine": lambda p: 0.5 * (1 + math.cos(math.pi * p)), "linear": lambda p: 1.0 - p,
             "constant": lambda p: 1.0}[cfg.schedule]

    def factor(s: int) -> float:
        if s < warm:
            return (s + 1) / warm
        return decay((s - warm + 1) / (cfg.steps - warm + 1))  # p = 0 at the peak step, < 1 at the last
    return factor


def check_packing(model, flash_kwargs: bool, what: str, log, accelerator) -> None:
    """Run each packed document on its own where `model`'s attention would let packed documents see each other
    (objectives.packing_isolates; any process finding it decides for all: they must run the same forwards), said
    once (`log`); peft's prompt learning runs them alone already."""
    if is_prompt_learning(model):
        return
    leaks = torch.tensor([0.0 if packing_isolates(model, flash_kwargs) else 1.0], device=accelerator.device)
    isolates = float(accelerator.reduce(leaks, "sum")) == 0
    run_documents_alone(model, not isolates)
    if not isolates and log is not None:
        attention = getattr(getattr(model, "config", None), "_attn_implementation", None)
        log(f"note: {what} ({type(model).__name__}, attention {attention}) would let the documents packed in a row "
            "attend to each other (its mask does not follow position_ids): each document runs on its own, one "
            "forward per document (slower)")


def accumulate(prepared, count_of, micro: list[dict], accelerator, offload=contextlib.nullcontext):
    """Forward and backward over this process's micro-batches of one step, each micro-batch's summed loss
    divided by the step's target count over all micro-batches and processes (counted first: one all-reduce with
    several processes, none with one).
    DDP averages gradients over processes, so the loss is scaled up by the process count to give Σ/count.
    The forward runs under accelerate's autocast (--mixed-precision): a model `prepare` wrapped autocasts already
    (the same context again changes nothing), one sharded by `shard_model` skips `prepare` and would run in fp32.
    Returns (this process's summed loss, the global count, the global number of tokens)."""
    device, world = accelerator.device, accelerator.num_processes
    count = sum(count_of(b) for b in micro)
    tokens = sum(b.get("num_tokens", b["input_ids"].numel()) for b in micro)  # real ones (not a bucket's padding)
    if world > 1:  # one all-reduce (and device read); one process knows its counts on the host
        counts = torch.tensor([count, tokens], device=device)
        count, tokens = (int(x) for x in accelerator.reduce(counts, "sum").tolist())
    loss_sum = torch.zeros((), device=device, dtype=torch.float32)
    for m, batch in enumerate(micro):
        sync = contextlib.nullcontext() if m == len(micro) - 1 else _no_sync(prepared, accelerator)
        with sync:
            with accelerator.autocast(), offload(), checked_on_host_for(batch):
                loss, _ = prepared(batch)
            accelerator.backward(loss * (world / max(count, 1)))
        loss_sum += loss.detach().float()
    return loss_sum, count, tokens


@contextlib.contextmanager
def _no_sync(prepared, accelerator):
    """No gradient all-reduce / reduce-scatter for this micro-batch (the last one of the step syncs)."""
    if hasattr(prepared, "set_requires_gradient_sync"):  # fully_shard'ed
        prepared.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            prepared.set_requires_gradient_sync(True)
    else:
        with accelerator.no_sync(prepared):
            yield


def settle_ddp_buckets(prepared, first_batch, accelerator, offload=contextlib.nullcontext) -> bool:
    """DDP with 3 or more processes: one synced forward and backward of `first_batch()`'s loss times 0 before the first
    step (its zero gradients discarded, the RNG restored), so that every step sums the gradients in the same order.

    torch's DDP all-reduces gradients in buckets laid out by a first guess, then lays them out again, once, in the
    order the first synced backward made them ready. Where an element sits in its bucket decides the order in which
    the all-reduce adds the processes' values (gloo's ring and NCCL's alike), and over 3 or more processes
    (a + b) + c and a + (b + c) round apart: a run's first step summed in another order than its later steps. A run
    resumed at step k sums its step k + 1 as a first step, the uninterrupted run as a later one: the resumed weights
    were rounding apart, not bit-identical (round 24). With 2 processes a + b = b + a: nothing to settle. Returns
    whether it ran (DDP over 3 or more processes)."""
    from torch.nn.parallel import DistributedDataParallel

    ddp = getattr(prepared, "_orig_mod", prepared)  # (compiled: accelerate compiles the DDP wrapper)
    if not isinstance(ddp, DistributedDataParallel) or accelerator.num_processes < 3:
        return False
    batch = first_batch()  # (built only here: other runs build their first batch once, as the step does)
    devices = [accelerator.device] if accelerator.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):  # dropout masks (and fastft's dropout seeds) drawn here: undone
        with accelerator.autocast(), offload(), checked_on_host_for(batch):
            loss, _ = prepared(batch)
        accelerator.backward(loss * 0.0)
    for p in ddp.parameters():
        p.grad = None
    return True


def _weights_finite(params, accelerator) -> bool:
    """Every trainable weight finite, on every process (FSDP2: each checks its shards; one all-reduce)."""
    bad = sum(int(not torch.isfinite(p.to_local() if hasattr(p, "to_local") else p).all()) for p in params)
    return int(accelerator.reduce(torch.tensor(bad, device=accelerator.device), "sum")) == 0


def _tokens_per_second(history: dict) -> float:
    """Training speed over the steps after each process run's first (Triton's compile and autotuning: tens of
    seconds on a GPU in a short run), or over every step while there is only the first."""
    if history.get("timed_seconds"):
        return history["timed_tokens"] / history["timed_seconds"]
    return history["tokens"] / max(history["train_seconds"], 1e-9)


def _clip(params, max_norm: float, accelerator, sharded_here: bool) -> float:
    if sharded_here:
        accelerator.unscale_gradients()  # fp16: the GradScaler's gradients are scaled up (a no-op otherwise)
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)  # DTensor gradients: the global norm
    else:  # (accelerate's FSDP2 plugin: DTensor gradients too)
        norm = accelerator.clip_grad_norm_(params, max_norm)
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


def _optimizer_step(optimizer, schedule, accelerator) -> bool:
    """The optimizer's step, then the schedule's unless fp16's GradScaler skipped it (inf/NaN gradients): the
    learning rate moves with the updates made. Returns whether the weights were updated."""
    optimizer.step()
    if accelerator.optimizer_step_was_skipped:
        return False
    schedule.step()
    return True


def train(cfg: TrainConfig) -> dict:
    given, cfg = cfg, validate(cfg)
    if cfg.compile != "off":  # a fresh dynamo, as in a new process: earlier runs' code caches (and their
        torch._dynamo.reset()  # recompile limits) must not decide whether this run's model compiles
    train_records, eval_records, description = load_records(cfg)  # malformed data fails before any model loads
    accelerator = make_accelerator(cfg)
    with hold_output_dir(cfg.output_dir, accelerator), deterministic_algorithms(cfg.deterministic), \
            inductor_takes_torch_random(cfg):
        return _run(cfg, accelerator, train_records, eval_records, description, given)  # one run writes there


@contextlib.contextmanager
def deterministic_algorithms(on: bool):
    """--deterministic: torch's deterministic algorithms while the run lasts (fastft's kernels follow the same
    switch, fastft.kernels.runtime.deterministic), with cuBLAS's fixed-size workspace where CUBLAS_WORKSPACE_CONFIG
    is unset (set before the run's first GEMM creates cuBLAS's handle); the process's setting is restored after."""
    if not on:
        yield
        return
    before = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before, warn_only=warn_only)


def _written_by(code: str | None) -> str:
    """What a resume says of the fastft that wrote its checkpoint when that was other code: the steps from here
    follow this code's arithmetic, and a change since (DoRA's rank path in fp32, prefix tuning through the fused
    loss) moves a resumed run off the writer's uninterrupted one in the last digits (audit round 16: ≤ 3.9e-5).
    Checkpoints keep the writer's code (provenance.git_commit) from 2026-12-07 on."""
    here = git_commit()
    if code == here:
        return ""
    writer = "an earlier fastft (no record of its code)" if code is None else f"fastft {code}"
    return (f"; written by {writer}, continued by {here}: steps computed as this code computes them, which may "
            "differ in the last digits from the writer's own")


def _run(cfg: TrainConfig, accelerator, train_records, eval_records, description, as_given: TrainConfig) -> dict:
    """as_given: the settings before validate, for config.yaml: --epochs, not the steps it gives here; an unset
    --dropout or --mixed-precision auto, not what validate resolved them to (reused with --objective dpo or on a GPU,
    those would be wrong)."""
    from accelerate.utils import set_seed
    from transformers import AutoConfig

    import fastft
    # imported here, not with the module: `python -m fastft.apps.training.report` imports this package (and so
    # this module) before it runs report, which runpy warns about when report is already imported
    from fastft.apps.training.report import write_report

    device, log = accelerator.device, accelerator.print
    world, rank = accelerator.num_processes, accelerator.process_index
    for note in launcher_notes(cfg) + precision_notes(cfg, device):
        log(note)
    fingerprint = data_fingerprint(cfg)
    out = Path(cfg.output_dir)
    checkpoints = ckpt.Checkpoints(out, accelerator)
    resume_from = checkpoints.latest() if cfg.resume else None
    layout, dtypes = distribution_layout(cfg, accelerator), resolved_dtypes(cfg, device)
    plan = BatchPlan(len(train_records), cfg.batch_size, cfg.grad_accum, world, cfg.seed,
                     records_digest(train_records))
    if cfg.epochs:
        given, cfg = cfg.steps, epochs_to_steps(cfg, len(train_records), plan.per_step)
        log(f"--epochs {cfg.epochs:g}: {cfg.steps} steps of {plan.per_step} records "
            f"({len(train_records) // plan.per_step} a pass over the {len(train_records)} training records)"
            + ("" if given in (TrainConfig.steps, cfg.steps) else f"; --steps {given} is not used"))
    if resume_from is not None:
        resumed = checkpoints.trainer_state(resume_from)  # before any model loads: a mismatch fails fast
        check_resumed_settings(cfg, resumed.get("config"), resume_from, models_fingerprinted="models" in resumed,
                               layout_recorded="layout" in resumed, dtypes_recorded="dtypes" in resumed)
        check_resumed_layout(resumed.get("layout"), layout, resume_from)
        check_resumed_dtypes(resumed.get("dtypes"), dtypes, resume_from)
        check_resumed_data(fingerprint, resumed.get("data"), resume_from)
        check_resumed_step(cfg, resumed["step"], resume_from)
        plan.load_state_dict(resumed["plan"])
    elif not cfg.resume and checkpoints.latest() is not None:
        raise ConfigError(f"--output-dir {cfg.output_dir} holds checkpoints of an earlier run "
                          f"({checkpoints.latest().name}); pass --resume to continue it, or choose another "
                          "--output-dir (or delete that one) to start a new run")
    elif (out / "metrics.json").is_file():  # a finished run without checkpoints (--save-every 0): overwritten,
        # its merged/ would have stayed beside the new run's adapter; resumed, it would have trained from step 0
        if cfg.resume:
            finished = check_finished_run_settings(cfg, as_given, out)
            if cfg.save_merged and not finished.get("merged_model"):
                return merge_finished_run(cfg, out, finished, load_models(cfg, device, accelerator), device,
                                          accelerator, log)
            log(f"--resume: {cfg.output_dir} holds this run finished (metrics.json, its config.yaml's settings); "
                "nothing to do")
            return finished
        raise ConfigError(f"--output-dir {cfg.output_dir} holds a finished run (metrics.json) and no checkpoint "
                          "of it; choose another --output-dir (or delete that one) to start a new run")
    set_seed(cfg.seed)

    model_path, tokenizer, load_model, load_tokenizer = load_models(cfg, device, accelerator)
    models = ckpt.model_fingerprints(cfg, model_path)
    if resume_from is not None:
        ckpt.check_resumed_models(models, resumed.get("models"), resume_from)
        finished = finished_metrics(cfg)  # every check passed: this very run, ended
        if finished is not None:  # running its end again would only overwrite metrics.json with a new peak memory
            longer = ("a larger --steps continues it" if "steps" in resume_may_change(cfg) else
                      "--steps may grow under --schedule constant --warmup-ratio 0 only")
            log(f"--resume: {cfg.output_dir} holds this run finished (step {cfg.steps} of {cfg.steps}, metrics.json); "
                f"nothing to do ({longer})")
            return finished
    model_config = AutoConfig.from_pretrained(model_path)  # the sizes, before the weights load
    problem, warning = length_problem(cfg, model_config)
    problem = rank_problem(cfg, model_config) or patch_problem(cfg, model_config) \
        or nf4_fsdp_problem(cfg, model_config, world) or problem
    if problem:
        raise ConfigError(problem)
    if warning:
        log(warning)
    check_tokenizer(tokenizer, train_records + eval_records, cfg.objective)
    teacher = None
    if cfg.objective == "distill":
        teacher_path, teacher_tokenizer = load_tokenizer(cfg.teacher)
        if teacher_tokenizer.get_vocab() != tokenizer.get_vocab():
            raise ConfigError(f"--teacher {cfg.teacher}: its tokenizer differs from the student's; distillation "
                              "on logits needs the same vocabulary")
    if accelerator.is_main_process:
        import yaml

        try:
            atomic_write(out / "config.yaml", yaml.safe_dump(to_yaml_dict(as_given), sort_keys=False))
        except OSError as e:  # a full disk, a quota: one line, as a checkpoint's failure is
            raise TrainingStopped(f"{out / 'config.yaml'} could not be written ({e}); nothing was trained") from None
    model = load_model(model_path, weights_dtype(cfg, device)).to(device)
    check_head_gives_logits(model, f"--model {cfg.model}")
    if cfg.objective == "distill":
        teacher = load_model(teacher_path, teacher_dtype(cfg, device)).to(device).eval().requires_grad_(False)
        check_head_gives_logits(teacher, f"--teacher {cfg.teacher}")
        check_vocab_rows(model, teacher, len(tokenizer), cfg.teacher)
    log(f"fastft train: {cfg.model} on {description}; {len(train_records)} train / {len(eval_records)} eval "
        f"records; objective {cfg.objective}, method {cfg.method}; device {device}, {world} process(es)")
    check_packing(model, cfg.attn_implementation == "fastft", f"--model {cfg.model}", log, accelerator)
    if teacher is not None:
        check_packing(teacher, cfg.attn_implementation == "fastft", f"--teacher {cfg.teacher}", log, accelerator)
    note = unused_settings(cfg, len(eval_records))
    if note:
        log(note)

    make_batch = Batches(Encoder(tokenizer, cfg.max_length, cfg.objective), device,
                          cfg.attn_implementation == "fastft", token_rows=token_rows(model, teacher))
    knobs = objective_knobs(cfg, teacher)
    history = {"eval_before": None, "eval_quantized": None, "evals": [], "train_losses": [], "tokens": 0,
               "train_seconds": 0.0, "timed_seconds": 0.0, "timed_tokens": 0}
    if resume_from is None and cfg.objective != "dpo":  # dpo's reference needs the adapters: evaluated below
        history["eval_before"] = evaluate(ObjectiveModel(model, cfg.objective, **knobs), eval_records, make_batch,
                                          cfg.eval_batch_size, accelerator)
        log(describe("before", history["eval_before"]))

    if cfg.objective == "dpo" and disable_model_dropout(model):
        log("dpo: the model's own dropout is off (as TRL's DPO turns it off): the policy's log-probs and the "
            "reference's differ by the adapters alone")
    model = apply_method_or_config_error(model, cfg, log)
    patched = maybe_patch(model, cfg, device, log)
    attention = causal_lm(model).config._attn_implementation
    if attention != cfg.attn_implementation:  # prefix tuning and patching run fastft's attention
        log(f"attention: {attention} (set by {'--patch-model' if patched else f'--method {cfg.method}'}), not "
            f"--attn-implementation {cfg.attn_implementation}")
    make_batch.flash_kwargs = attention == "fastft"  # packed rows then carry their document boundaries
    if attention != cfg.attn_implementation:
        check_packing(model, make_batch.flash_kwargs, f"--model {cfg.model}", None, accelerator)  # patched: its own
    if cfg.gradient_checkpointing:
        base = causal_lm(model)
        enable_checkpointing(base)  # non-reentrant, without the input-grad hook that breaks --compile's graph
        base.config.use_cache = False
    trainable, total = parameter_counts(model)  # each stored weight once (NF4 by its logical size)
    log(f"{cfg.method}: {trainable:,} trainable of {total:,} parameters")
    objective = ObjectiveModel(model, cfg.objective, **knobs)
    if cfg.pad_to_buckets == "on":
        make_batch.bucket = not documents_alone(model)  # (prompt learning: refused by validate)
        if not make_batch.bucket:
            log("note: --pad-to-buckets: this model runs each packed document on its own, one forward per "
                "document length whatever the row's: its micro-batches are not padded")
    objective._no_split_modules = getattr(causal_lm(model),
                                          "_no_split_modules", None)  # FSDP2's auto-wrap reads this
    if resume_from is None and (cfg.objective == "dpo" or cfg.method == "qlora"):
        key = "eval_before" if cfg.objective == "dpo" else "eval_quantized"
        history[key] = evaluate(objective, eval_records, make_batch, cfg.eval_batch_size, accelerator)
        log(describe("before" if key == "eval_before" else "quantized", history[key]))

    sharded_here = shard_model(objective, cfg, accelerator)
    fsdp = layout == "fsdp"  # sharded here, or by accelerate's FSDP2 plugin in prepare
    loraplus = cfg.loraplus_lr_ratio if cfg.method in LORA_METHODS else 0.0  # another method's vectors are not LoRA's
    try:
        optimizer = make_optimizer(cfg.optimizer, model, cfg.lr, cfg.weight_decay, fsdp=fsdp,
                                   grad_scaler=cfg.mixed_precision == "fp16", loraplus_lr_ratio=loraplus)
    except ValueError as error:  # an accelerate config that runs FSDP under --distributed auto
        raise ConfigError(f"--optimizer {cfg.optimizer}: {error}") from None
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg))
    if sharded_here:  # accelerate's prepare would wrap it again: compiled here as prepare would have
        prepared, optimizer = objective, accelerator.prepare(optimizer)
        if cfg.compile != "off":
            prepared = torch.compile(objective, **accelerator.state.dynamo_plugin.to_kwargs())
    else:
        prepared, optimizer = accelerator.prepare(objective, optimizer)
        # the plain module (no DDP, no compiled wrapper): evaluation runs it eagerly, and its weights keep their
        # names (a compiled wrapper's state dict adds `_orig_mod.`)
        objective = accelerator.unwrap_model(prepared, keep_torch_compile=False)
    inner = objective.model
    # after prepare: accelerate's FSDP2 plugin (a GPU's --distributed fsdp) shards there, replacing every parameter;
    # the ones from before would have no gradients to clip nor weights to check
    params = [p for p in inner.parameters() if p.requires_grad]
    torch_optimizer = getattr(optimizer, "optimizer", optimizer)
    is_peft = cfg.method != "full"  # an adapter is saved: peft's format, or the bottleneck adapter's own
    distribution = {"type": "FSDP2 (fully_shard)" if sharded_here else accelerator.distributed_type.value,
                    "sharded": ckpt.is_sharded(inner)}
    log(f"distribution: {distribution['type']}{' (parameters sharded)' if distribution['sharded'] else ''}")
    if cfg.save_merged and distribution["sharded"]:  # FSDP from an accelerate config under --distributed auto
        raise ConfigError("--save-merged merges the whole model in one process, not FSDP's shards; merge the saved "
                          "adapter afterwards (README: fastft train --save-merged)")
    compiled = CompileRecord(cfg, prepared)
    if compiled.compiled:
        log(f"compiled: torch.compile mode {cfg.compile}, backend {cfg.compile_backend} (the first steps compile)")

    def save_adapter_to(path, weights):
        fastft.save_adapter(inner, path, state_dict=weights)

    def trainer_state():
        # the peak so far travels with the checkpoint: a resumed run reports the whole run's, not its own process's
        # (a finished run resumed for --save-merged trained nothing: 1.07 GiB where training took 1.79)
        history["peak_memory_gib"] = max(history.get("peak_memory_gib") or 0.0, peak_memory_gib(device))
        return {"scheduler": schedule.state_dict(), "plan": plan.state_dict(), "history": history,
                "config": ckpt.comparable_settings(to_yaml_dict(cfg)), "data": fingerprint, "models": models,
                "layout": layout, "dtypes": dtypes, "code": git_commit(),
                "scaler": ckpt.scaler_state(accelerator),  # collective (every process saves at the same step):
                "record_flags": record_flags(make_batch, len(train_records), earlier_flags, accelerator)}

    if world > 1:  # same initialisation everywhere (above), but each process its own dropout masks from here on
        torch.manual_seed(cfg.seed * 1_000_003 + rank)
    start_step, earlier_flags = 0, None
    if resume_from is not None:
        earlier_flags = resumed.get("record_flags")  # None from a checkpoint written before they were kept
        checkpoints.load(resume_from, inner, torch_optimizer)
        if accelerator.is_main_process:
            checkpoints.remove_others(resume_from)
        schedule.load_state_dict(resumed["scheduler"])
        ckpt.restore_scaler(accelerator, resumed.get("scaler"))
        history, start_step = resumed["history"], resumed["step"]
        log(f"resumed from {resume_from} (step {start_step} of {cfg.steps}){_written_by(resumed.get('code'))}")
    elif cfg.resume:
        log(f"--resume: no checkpoint in {checkpoints.root}; starting at step 0")
    try:
        runlog = RunLog(cfg.output_dir, accelerator.is_main_process, start_step if resume_from is not None else None,
                        eval_steps={e["step"] for e in history["evals"]})
    except OSError as e:
        raise TrainingStopped(f"{out / 'logs.jsonl'} could not be written ({e}); stopped before step {start_step + 1}"
                              ) from None

    def stop(step: int, why: str, before: str = "the optimizer step"):
        last = checkpoints.latest()
        where = f"the last good checkpoint is {last} (fastft train ... --resume continues from it)" if last else \
            "no checkpoint was written (--save-every N writes them)"
        raise TrainingStopped(f"step {step}: {why}; stopped before {before}, {where}")

    def write_log(record: dict):  # a full disk at logs.jsonl: one line naming it, as at a checkpoint
        try:
            runlog.write(record)
        except OSError as e:
            stop(record["step"], f"{runlog.path} could not be written ({e})", "the next step")

    def stop_unless_finite(step: int, before: str):  # an update no later loss saw (the last, or one saved now)
        if not _weights_finite(params, accelerator):
            stop(step, "the weights are not finite after its optimizer step (try a lower --lr, --max-grad-norm, "
                       "or fp32)", before)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    prepared.train()
    offload = (lambda: torch.autograd.graph.save_on_cpu(pin_memory=device.type == "cuda")) \
        if cfg.offload_activations else contextlib.nullcontext
    if cfg.eval_every and 0 < start_step < cfg.steps and start_step % cfg.eval_every == 0 \
            and all(e["step"] != start_step for e in history["evals"]):
        # a finished run extended (a larger --steps): its last step was evaluated as "after", which its checkpoint
        # does not hold; evaluated now, on the same weights, as the uninterrupted run's periodic evaluation
        result = evaluate(objective, eval_records, make_batch, cfg.eval_batch_size, accelerator)
        if result is not None:
            history["evals"].append({"step": start_step, **result})
            write_log({"step": start_step, "eval": result})
    if start_step < cfg.steps:  # (the first step's first micro-batch, as that step builds it: tokenized now)
        try:
            settle_ddp_buckets(prepared, lambda: make_batch(train_records, plan.peek_step(rank)[0]), accelerator,
                               offload)
        except torch.OutOfMemoryError as e:
            stop(start_step + 1, f"out of memory ({str(e).splitlines()[0]}); try --gradient-checkpointing (and "
                                 "--offload-activations), or a smaller --batch-size with a larger --grad-accum of the "
                                 f"same product ({cfg.batch_size * cfg.grad_accum}): --resume accepts these")
    bar = tqdm(range(start_step, cfg.steps), initial=start_step, total=cfg.steps, desc="train",
               disable=not accelerator.is_local_main_process, dynamic_ncols=True)
    for step in bar:
        started = time.perf_counter()
        micro = make_batch.step(train_records, plan.next_step(rank))
        try:
            loss_sum, count, tokens = accumulate(prepared, objective.count, micro, accelerator, offload)
        except torch.OutOfMemoryError as e:
            stop(step + 1, f"out of memory ({str(e).splitlines()[0]}); try --gradient-checkpointing (and "
                           "--offload-activations), or a smaller --batch-size with a larger --grad-accum of the same "
                           f"product ({cfg.batch_size * cfg.grad_accum}): --resume accepts these")
        del micro
        if step + 1 < cfg.steps:  # the next step's batches, built while the device runs this step's queued work
            make_batch.prefetch(train_records, plan.peek_step(rank))
        if count == 0:  # AdamW would still move the weights (momentum, weight decay) on zero gradients
            stop(step + 1, "its batches hold no target token (every label is masked out); check the data's "
                           "prompts against --max-length")
        step_loss = float(accelerator.reduce(loss_sum, "sum")) / count
        if not math.isfinite(step_loss):
            stop(step + 1, f"the loss is {step_loss} (try a lower --lr, --max-grad-norm, or fp32)")
        grad_norm = None
        if cfg.max_grad_norm > 0:
            grad_norm = _clip(params, cfg.max_grad_norm, accelerator, sharded_here)
        lr = schedule.get_last_lr()[0]
        _optimizer_step(optimizer, schedule, accelerator)
        optimizer.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - started
        history["train_seconds"] += seconds
        history["tokens"] += tokens
        history["train_losses"].append(step_loss)
        if step > start_step:  # the first step of a process compiles and autotunes kernels: not in the speed
            history["timed_seconds"] = history.get("timed_seconds", 0.0) + seconds
            history["timed_tokens"] = history.get("timed_tokens", 0) + tokens
        speed = _tokens_per_second(history)
        memory = peak_memory_gib(device)
        write_log({"step": step + 1, "loss": step_loss, "lr": lr, "grad_norm": grad_norm, "targets": count,
                      "tokens": tokens, "step_seconds": seconds, "tokens_per_second": speed,
                      "memory_gib": memory})
        bar.set_postfix(loss=f"{step_loss:.3f}", tok_s=f"{speed:,.0f}", mem=f"{memory:.2f}GiB")
        cut_so_far, seen_so_far = make_batch.tokenized() if step == start_step else (None, None)
        if cut_so_far and accelerator.is_local_main_process:
            # said now, not only at the end (hours later): the whole run's count follows after the last step
            bar.write(f"note: {len(cut_so_far):,} of the {len(seen_so_far):,} training records this process "
                      f"has tokenized so far were longer than --max-length {cfg.max_length} and were cut ({CUT_RULE}); "
                      "a larger --max-length keeps them whole")
        if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.steps:
            result = evaluate(objective, eval_records, make_batch, cfg.eval_batch_size, accelerator)
            if result is not None:
                history["evals"].append({"step": step + 1, **result})
                write_log({"step": step + 1, "eval": result})
                bar.write(describe(f"step {step + 1}", result)) if accelerator.is_local_main_process else None
        if cfg.save_every and (step + 1) % cfg.save_every == 0:
            stop_unless_finite(step + 1, "its checkpoint")
            try:
                checkpoints.save(step + 1, inner, torch_optimizer, trainer_state(),
                                 save_adapter_to if is_peft else None)
            except OSError as e:  # a full disk, a quota: the previous checkpoint stands
                stop(step + 1, f"its checkpoint could not be written ({e})", "the next step")
    bar.close()
    stop_unless_finite(cfg.steps, "saving")
    peak = max(peak_memory_gib(device), history.get("peak_memory_gib") or 0.0)
    cut, seen = (int(n) for n in record_flags(make_batch, len(train_records), earlier_flags, accelerator).sum(1))
    if cut:
        log(f"note: {cut:,} of the {seen:,} training records the run tokenized were longer than --max-length "
            f"{cfg.max_length} and were cut ({CUT_RULE}); a larger --max-length keeps them whole")

    after = evaluate(objective, eval_records, make_batch, cfg.eval_batch_size, accelerator)
    log(describe("after", after))
    # merging needs the whole model in one process (a copy of it): not under FSDP2's shards; not for dpo, whose
    # reference (the adapter-free model) a merged model no longer has
    merged = evaluate_merges(inner, objective, eval_records, make_batch, cfg, accelerator, log) \
        if cfg.method == "qlora" and eval_records and not sharded_here and cfg.objective != "dpo" else None
    if after is not None:
        write_log({"step": cfg.steps, "eval": after})
    runlog.close()
    seconds = history["train_seconds"]
    compile_result = compiled.result()
    if compile_result.get("recompile_limit_hits"):
        log(f"torch.compile: dynamo hit its recompile limit {compile_result['recompile_limit_hits']}x: parts of the "
            "step ran eagerly from then on (metrics.json: compile)")
    metrics = {
        "config": dataclasses.asdict(cfg), "device": str(device), "processes": world, "distribution": distribution,
        "compile": compile_result, "trainable_parameters": trainable, "total_parameters": total,
        "eval_before": history["eval_before"], "eval_quantized": history["eval_quantized"], "eval_after": after,
        "evals": history["evals"], "train_losses": history["train_losses"],
        "train_seconds": seconds, "tokens_per_second": _tokens_per_second(history),
        "eval_merged": merged, "resumed_from": str(resume_from) if resume_from else None,
        "records_cut": {"cut": cut, "tokenized": seen},
        "peak_memory_gib": peak, "peak_memory_kind": "cuda allocated" if device.type == "cuda" else "process RSS",
    }
    weights = ckpt.full_state_dict(inner, trainable_only=is_peft)  # collective under FSDP2
    saved = out / "adapter" if is_peft else out / "model"

    if cfg.save_merged:
        metrics["merged_model"] = str(out / "merged")

    def save_final():  # rank 0 writes; run_shared tells every rank whether it failed (none waits for a timeout)
        with write_failures_as_os_errors(out):  # a full disk: the one-line stop below, not a traceback
            save_final_files()

    def save_final_files():
        if is_peft:
            fastft.save_adapter(inner, saved, state_dict=weights)
        else:
            replace_folder(saved, lambda tmp: (inner.save_pretrained(str(tmp), state_dict=weights),
                                               tokenizer.save_pretrained(str(tmp))))
        if cfg.save_merged:  # the run's last use of the model: merged in place, no second copy
            merged_model = fastft.merge_and_unload(inner)
            replace_folder(out / "merged", lambda tmp: (merged_model.save_pretrained(str(tmp)),
                                                        tokenizer.save_pretrained(str(tmp))))
        write_report(out, metrics)  # report.md and losses.png, before metrics.json: it marks the run finished
        atomic_write(out / "metrics.json", json.dumps(metrics, indent=2))

    try:
        run_shared(save_final, accelerator.is_main_process, "the final save")
    except OSError as e:
        stop(cfg.steps, f"the {'adapter' if is_peft else 'model'}{', merged model' if cfg.save_merged else ''} or "
                        f"metrics.json could not be saved ({e})",
             "the final save")
    merged_to = f", merged into the base weights in {out / 'merged'}" if cfg.save_merged else ""
    log(f"{metrics['tokens_per_second']:,.0f} tokens/s, peak memory {peak:.2f} GiB ({metrics['peak_memory_kind']}); "
        f"{'adapter' if is_peft else 'model'} saved to {saved}{merged_to}")
    return metrics


class CompileRecord:
    """What metrics.json says about compilation: the setting, whether the trained module is compiled, and how
    many graphs dynamo compiled, graph breaks it met and recompile limits it hit (each sends a frame back to eager
    from then on) in this process since (evaluation runs uncompiled)."""

    def __init__(self, cfg: TrainConfig, prepared):
        from accelerate.utils import is_compiled_module

        self.cfg, self.compiled = cfg, is_compiled_module(prepared)
        self.start = dynamo_counts()

    def result(self) -> dict:
        out = {"compiled": self.compiled, "mode": self.cfg.compile, "backend": self.cfg.compile_backend}
        if self.compiled:
            out.update({k: v - self.start[k] for k, v in dynamo_counts().items()})
        return out
