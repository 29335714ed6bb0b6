"""What `fastft train --resume` refuses: a checkpoint written with other settings, other data or more steps than
the run has (the models' fingerprints: checkpoints.check_resumed_models)."""
from __future__ import annotations

import json
from pathlib import Path

from fastft.apps.training import checkpoints as ckpt
from fastft.apps.training.config import ConfigError, TrainConfig, teacher_dtype, to_yaml_dict, weights_dtype


# Settings a resumed run may change: they decide what is evaluated and saved, or how the same steps are computed
# (compiled or not; padded to buckets or not; activations kept, recomputed or offloaded: the same values), not what
# is trained. --steps too when no learning rate depends on it (constant, no warm-up). --eval-examples may move the
# held-out split of --data: the batch plan's record count and digest refuse that (BatchPlan.load_state_dict), and
# let a value that leaves the split as it was through.
RESUME_MAY_CHANGE = ("resume", "output_dir", "save_every", "eval_every", "eval_examples", "eval_batch_size",
                     "compile", "compile_backend", "pad_to_buckets", "gradient_checkpointing", "offload_activations",
                     "deterministic", "save_merged", "epochs")  # the steps it gives are compared (so it changes as --steps may)



def resume_may_change(cfg: TrainConfig, saved: dict | None = None) -> tuple[str, ...]:
    """RESUME_MAY_CHANGE, --steps under a constant schedule, and --batch-size / --grad-accum when their product
    is the checkpoint's: a step then takes the same records (BatchPlan: the step's slice of the order, cut into
    other micro-batches), and its loss is Σ over the step's targets / their count whatever the cut (`accumulate`).
    Only the rounding of the sums changes, and with --dropout the masks drawn (one draw per micro-batch)."""
    extra = ("steps",) if cfg.schedule == "constant" and cfg.warmup_ratio == 0 else ()
    if saved is not None and saved.get("batch_size", 0) * saved.get("grad_accum", 0) == cfg.batch_size * cfg.grad_accum:
        extra += ("batch_size", "grad_accum")
    return RESUME_MAY_CHANGE + extra



def check_resumed_settings(cfg: TrainConfig, saved: dict | None, checkpoint: Path,
                           models_fingerprinted: bool = True, layout_recorded: bool = False,
                           dtypes_recorded: bool = False) -> None:
    """A ConfigError naming every training setting that differs from the checkpoint's run: resuming with another
    learning rate, rank, method or data would mix two runs (and a restored optimizer or scheduler keeps the old
    values), so only the RESUME_MAY_CHANGE settings may differ. models_fingerprinted: False for a checkpoint
    written before they kept the models' fingerprints (ckpt.check_resumed_models): --model/--teacher then compare
    as the paths given, the only check there is. layout_recorded: the checkpoint keeps its distribution layout
    (check_resumed_layout compares that): --distributed may then change in its spelling (auto <-> ddp under
    torchrun, auto <-> none in one process). dtypes_recorded: the checkpoint keeps the dtypes --dtype gave
    (check_resumed_dtypes compares those): --dtype may then change in its spelling (auto <-> fp32 on the CPU)."""
    if saved is None:  # fastft before 2026-12-01 (64f39b8): no settings kept, and another learning-rate schedule
        raise ConfigError(f"--resume: {checkpoint} was written by a fastft from before 2026-12-01, which kept no "
                          "record of the run's settings or data and followed another learning-rate schedule: "
                          "resuming it would mix two runs; start a new run in another --output-dir")
    spelled = (("distributed",) if layout_recorded else ()) + (("dtype",) if dtypes_recorded else ())
    changed = _changed_settings(cfg, to_yaml_dict(cfg), saved, raw=() if models_fingerprinted else ("model", "teacher"),
                                also=spelled)
    if changed:
        raise ConfigError(f"--resume: {checkpoint} was written with other settings ({'; '.join(changed)}); resume "
                          "with the run's own settings (its config.yaml: fastft train --config ... --resume; --steps "
                          "may change under --schedule constant --warmup-ratio 0, --batch-size and --grad-accum when "
                          "their product stays), or start a new run in another --output-dir")



def _changed_settings(cfg: TrainConfig, now: dict, saved: dict, raw: tuple = (), real: tuple = (),
                      fixed: tuple = (), also: tuple = ()) -> list:
    """"--name saved -> now" for each setting that differs and may not (resume_may_change and `also`, less
    `fixed`). A setting added since `saved` was written had its default then; spellings of one setting compare
    equal, and paths by content (compared apart), except the `raw` ones, compared as given, and the `real` ones, as
    the paths they name."""
    raw_saved, raw_now = {**to_yaml_dict(TrainConfig()), **saved}, now
    saved, now = ckpt.comparable_settings(raw_saved), ckpt.comparable_settings(raw_now)
    for name in raw:
        saved[name], now[name] = raw_saved[name], raw_now[name]
    for name in real:
        saved[name], now[name] = _real_path(raw_saved[name]), _real_path(raw_now[name])
    may_change = [k for k in resume_may_change(cfg, saved) + also if k not in fixed]
    return [f"--{k.replace('_', '-')} {saved[k]!r} -> {now[k]!r}" for k in now
            if k not in may_change and saved.get(k) != now[k]]


def _real_path(value):
    """A path setting as the folder or file it names (a relative and an absolute spelling compare equal); the
    built-in model's name and None as they are."""
    return value if value is None or not Path(value).exists() else str(Path(value).resolve())


def check_finished_run_settings(cfg: TrainConfig, as_given: TrainConfig, out: Path) -> dict:
    """--resume on a finished run without checkpoints (--save-every 0): its metrics.json when its config.yaml holds
    these settings, compared as a checkpoint's are (spellings, paths by what they name; what is evaluated and saved
    may differ). There is nothing to train again: --steps / --epochs may not grow (a ConfigError saying what to do);
    a --save-merged the run lacks is made from its adapter (finished_merge)."""
    import yaml

    try:
        saved = yaml.safe_load((out / "config.yaml").read_text())
        metrics = json.loads((out / "metrics.json").read_text())
    except (OSError, ValueError, yaml.YAMLError) as e:
        raise ConfigError(f"--resume: {out} holds a finished run (metrics.json) without checkpoints whose "
                          f"config.yaml or metrics.json cannot be read ({e}); choose another --output-dir") from None
    if not isinstance(saved, dict) or not isinstance(metrics, dict):
        raise ConfigError(f"--resume: {out}/config.yaml or metrics.json is not a mapping; choose another --output-dir")
    changed = _changed_settings(cfg, to_yaml_dict(as_given), saved, real=ckpt.PATH_SETTINGS,
                                fixed=("steps", "epochs"))
    if changed:
        raise ConfigError(f"--resume: {out} holds a finished run (metrics.json) without checkpoints, written with "
                          f"other settings ({'; '.join(changed)}); without a checkpoint nothing continues it: resume "
                          f"with its own settings (fastft train --config {out / 'config.yaml'} --resume), or start a "
                          "new run in another --output-dir")
    if cfg.save_merged and not metrics.get("merged_model") and not (out / "adapter").is_dir():
        raise ConfigError(f"--resume --save-merged: {out} holds a finished run without checkpoints (--save-every 0) "
                          "and without its adapter folder, so there is nothing to merge; train again with "
                          "--save-merged")
    return metrics


LAYOUTS = {"fsdp": "sharded over the processes (FSDP)", "ddp": "whole on every process (DDP)",
           "none": "in one process"}


def check_resumed_layout(saved: str | None, now: str, checkpoint: Path) -> None:
    """A ConfigError when the checkpoint's run kept its weights and optimizer state in another layout
    (run_setup.distribution_layout) than this run: FSDP's optimizer state does not load into DDP's nor the other
    way (a KeyError deep in torch), and --distributed auto takes FSDP from an `accelerate launch` config, so the
    settings alike do not say the layouts are. None: written before checkpoints kept it (--distributed then
    compares as given)."""
    if saved is not None and saved != now:
        raise ConfigError(f"--resume: {checkpoint} was written by a run whose state was {LAYOUTS.get(saved, saved)}, "
                          f"this run's is {LAYOUTS.get(now, now)}; resume under the launch it started with (the same "
                          "--distributed and `accelerate launch` config), or start a new run in another --output-dir")


def resolved_dtypes(cfg: TrainConfig, device) -> dict:
    """The dtypes --dtype gives the run's weights here, and a distill teacher's (None without one): auto is bf16 on
    a GPU and fp32 on the CPU (config.weights_dtype), so the setting alike does not say the precision is."""
    def name(dtype):
        return str(dtype).removeprefix("torch.")

    return {"weights": name(weights_dtype(cfg, device)),
            "teacher": name(teacher_dtype(cfg, device)) if cfg.objective == "distill" else None}


def check_resumed_dtypes(saved: dict | None, now: dict, checkpoint: Path) -> None:
    """A ConfigError when the checkpoint's run held its weights (or its teacher) in other dtypes than this run:
    --dtype auto written on a GPU (bf16) and resumed on the CPU (fp32), or the other way, would continue the run on
    a base of another precision (the trainable adapters are fp32 either way: their check passes). None: written
    before checkpoints kept them (--dtype then compares as given)."""
    if saved is None:
        return
    changed = [f"{name} {saved.get(name)} -> {dtype}" for name, dtype in now.items() if saved.get(name) != dtype]
    if changed:
        raise ConfigError(f"--resume: {checkpoint} was written by a run whose weights were of other dtypes (--dtype: "
                          f"{'; '.join(changed)}; auto is bf16 on a GPU, fp32 on the CPU); resume with the --dtype "
                          "that gives the run's own, or start a new run in another --output-dir")


def check_resumed_data(fingerprint: dict, saved: dict | None, checkpoint: Path) -> None:
    """A ConfigError when --data or --eval-data changed (size or sha256) since the checkpoint was written: the
    same path with other contents would resume another run's data."""
    if saved is None:  # written before checkpoints kept the data's fingerprint
        return
    for name, now in fingerprint.items():
        before = saved.get(name)
        if before is not None and now is not None and before != now:
            size = "" if before["size"] == now["size"] else f" ({before['size']} -> {now['size']} bytes)"
            raise ConfigError(f"--resume: --{name.replace('_', '-')} changed since {checkpoint} was written{size}, "
                              "its sha256 differs; resume with the data the run started with, or start a new run "
                              "in another --output-dir")



def check_resumed_step(cfg: TrainConfig, step: int, checkpoint: Path) -> None:
    if cfg.steps < step:  # the run would log "step 8 of 4" and train nothing
        raise ConfigError(f"--resume: {checkpoint} is at step {step}, past --steps {cfg.steps}; resume with --steps "
                          f"{step} or more, or start a new run in another --output-dir")


def finished_metrics(cfg: TrainConfig) -> dict | None:
    """The metrics.json of this run when it has finished: written last, by the final save, for these --steps with
    every step's loss, and nothing asked that it lacks (--save-merged's model). None otherwise: a run killed after
    its last checkpoint finishes its evaluation and saves. Not read from the checkpoint's step: with --steps not a
    multiple of --save-every the last checkpoint is before the last step, and a finished run was trained again
    from there (its adapter and metrics.json rewritten). Called once every resume check passed (this very run)."""
    try:
        metrics = json.loads((Path(cfg.output_dir) / "metrics.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(metrics, dict) or not isinstance(metrics.get("config"), dict):
        return None
    done = metrics["config"].get("steps") == cfg.steps and len(metrics.get("train_losses") or ()) == cfg.steps
    return metrics if done and (metrics.get("merged_model") or not cfg.save_merged) else None
